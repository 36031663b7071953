#!/usr/bin/env bash
# The prepared GPU check (one H100/H200, at most ~8 minutes):
#   1. every implementation against the float64 reference on CUDA at a few shapes
#      (fp32, bf16, causal, window, window + 4 attention sinks, GQA, D=80, N=1000 which is not a
#      multiple of 128; fwd+bwd);
#   2. the performance sweep: bf16, B=1, Hq=32, Hkv=8, D=128, causal and window=4096,
#      N = 1024..32768, modes fwd and fwd+bwd, triton and every SDPA backend (and flash_attn);
#   3. CSVs under OUTDIR/<run>/results.csv, plots OUTDIR/*.png, and a short table printed last.
#
# usage: benchmarks/gpu_check.sh OUTDIR [--dry-run]
#   On the device tool (files come back only from $OUT, at most 8):
#     benchmarks/gpu_check.sh /tmp/gc; tar -czf $OUT/gpu_check.tgz -C /tmp/gc .; cp /tmp/gc/*.png $OUT/
#   --dry-run runs the same code paths on the CPU at tiny sizes (Triton through its interpreter).
# Needs no network: on a machine whose python has torch, triton, click, rich, psutil, pandas and
# seaborn (the GPU image has them), ctxbench itself is installed from this checkout, offline.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR [--dry-run]}
DRY=${2:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Run from OUT, not from the checkout: there `python -m ctxbench` would import the source tree's
# ctxbench/ (without kernels/) instead of the installed package.
cd "$OUT"

if ! $PY -c "import ctxbench.kernels, ctxbench.cli" 2>/dev/null; then
  echo "installing ctxbench from $ROOT (offline, no dependencies)"
  $PY -m pip install -q --no-deps --no-build-isolation --no-index -e "$ROOT" \
    || $PY -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/ctxbench-site "$ROOT" \
    || { echo "gpu_check: cannot install ctxbench" >&2; exit 2; }
  [ -d /tmp/ctxbench-site ] && export PYTHONPATH=/tmp/ctxbench-site:${PYTHONPATH:-}
fi

if [ "$DRY" = "--dry-run" ]; then
  DEV=(--device cpu --allow-interpreter --rep-ms 2 --timeout 300 --ppl-max-len 0)
  CHECK_LENS=17,40
  PERF_LENS=16,32
  PERF_SHAPE=(--batch 1 --heads 4 --kv-heads 2 --head-dim 32)
  WINDOW=8
  CHECK_SHAPES=("--dtype fp32 --mask causal --heads 2 --kv-heads 2 --head-dim 16"
                "--dtype bf16 --mask window --window 5 --heads 4 --kv-heads 2 --head-dim 32"
                "--dtype bf16 --mask none --heads 4 --kv-heads 1 --head-dim 20"
                "--dtype fp32 --mask window --window 5 --sinks 3 --heads 4 --kv-heads 2 --head-dim 16")
  PERF_IMPLS=triton,sdpa,flash_attn
  WINDOW_IMPLS=triton,sdpa
elif [ -n "$DRY" ]; then
  echo "usage: benchmarks/gpu_check.sh OUTDIR [--dry-run]" >&2; exit 2
else
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_check: torch sees no CUDA device; use --dry-run on a CPU" >&2; exit 2; }
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv" 2>/dev/null || true
  DEV=(--device cuda --timeout 180 --ppl-max-len 0)
  CHECK_LENS=1000,2048
  PERF_LENS=1024,2048,4096,8192,16384,32768
  PERF_SHAPE=(--batch 1 --heads 32 --kv-heads 8 --head-dim 128)
  WINDOW=4096
  CHECK_SHAPES=("--dtype fp32 --mask causal --heads 8 --kv-heads 8 --head-dim 64"
                "--dtype bf16 --mask window --window 256 --heads 32 --kv-heads 8 --head-dim 128"
                "--dtype bf16 --mask none --heads 8 --kv-heads 2 --head-dim 80"
                "--dtype bf16 --mask window --window 256 --sinks 4 --heads 8 --kv-heads 2 --head-dim 64")
  PERF_IMPLS=triton,sdpa_flash,sdpa_cudnn,sdpa_efficient,sdpa_math,flash_attn
  WINDOW_IMPLS=triton,sdpa_efficient,sdpa_math,flash_attn
fi

# Autotune timings are cached on disk, so the fwd and fwd+bwd sweeps (separate processes)
# don't tune the same forward shapes twice; correctness checks use fixed configurations.
export TRITON_CACHE_AUTOTUNING=1
start=$(date +%s)
i=0
for shape in "${CHECK_SHAPES[@]}"; do
  i=$((i + 1))
  echo "== check $i: $shape"
  # shellcheck disable=SC2086
  CTXBENCH_TRITON_AUTOTUNE=0 $PY -m ctxbench sweep "${DEV[@]}" $shape --mode fwd+bwd --lengths "$CHECK_LENS" --rep-ms 5 \
      --out "$OUT" --run-id "check$i" > "$OUT/check$i.log" 2>&1 || echo "check $i exited $?"
done
for mode in fwd fwd+bwd; do
  tag=${mode/+/_}
  echo "== perf causal $mode"
  $PY -m ctxbench sweep "${DEV[@]}" "${PERF_SHAPE[@]}" --dtype bf16 --mask causal --mode "$mode" \
      --lengths "$PERF_LENS" --impls "$PERF_IMPLS" --out "$OUT" --run-id "perf-causal-$tag" \
      > "$OUT/perf-causal-$tag.log" 2>&1 || echo "perf causal $mode exited $?"
  echo "== perf window=$WINDOW $mode"
  $PY -m ctxbench sweep "${DEV[@]}" "${PERF_SHAPE[@]}" --dtype bf16 --mask window --window "$WINDOW" --mode "$mode" \
      --lengths "$PERF_LENS" --impls "$WINDOW_IMPLS" --out "$OUT" --run-id "perf-window-$tag" \
      > "$OUT/perf-window-$tag.log" 2>&1 || echo "perf window $mode exited $?"
done
echo "== took $(( $(date +%s) - start )) s"
$PY "$ROOT/benchmarks/gpu_summary.py" "$OUT"
