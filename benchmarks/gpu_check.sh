#!/usr/bin/env bash
# The prepared GPU check: one H100/H200, the whole run (compilation and autotuning included)
# within 8 minutes. Every cell's result goes straight into OUTDIR as it finishes
# (OUTDIR/<stage>/results.csv, logs OUTDIR/<stage>.log, OUTDIR/stages.txt), so whatever was
# measured before a timeout is there; nothing is packed at the end.
#
# Stages, most important first. Each has a time budget; a stage still running at its budget is
# stopped (SIGINT: its finished cells stay) and says so, and a stage that the remaining time
# cannot hold is skipped and says so:
#   1. causal-fwd-long    triton vs sdpa_flash (and sdpa_cudnn), bf16 causal forward, N=8K..32K
#   1b. decode, decode-paged  one query token, B=8 ragged (KV lengths drawn in [N/8, N]), bf16,
#                         Lk=4K..128K: triton_decode vs sdpa and chunked, contiguous and in pages of
#                         16 tokens; GB/s against the H200's 4.8 TB/s, timed as CUDA-graph replays
#   2. check1..check4     every implementation against float64 on CUDA at N=1000 (not a multiple
#                         of 128), fwd+bwd: fp32 causal, bf16 window, bf16 GQA D=80, bf16 window+sinks
#   3. causal-fwdbwd-long triton vs sdpa_flash, causal fwd+bwd, N=8K..32K
#   3b. engines-check, engines-fwd-long: flex (FlexAttention, compiled), flashinfer and
#                         xformers (each when installed, else an unsupported row): fp16/bf16
#                         window fwd+bwd at N=1000 against float64, then bf16 causal forward
#                         N=8K..32K beside sdpa_flash. flex compiles here, not in the checks.
#   4. window-fwd-long, window-fwdbwd-long: triton vs sdpa_efficient, window=4096, N=8K..32K
#   5. causal-fwdbwd-long-fuseddq: triton with dQ fused into dK/dV (5 matmuls, atomics) at
#                         D=128, where it is off by default (7 matmuls): reported as
#                         triton_fuseddq, to decide the default from a measurement
#   6. causal-fwd-short   N=1K..4K, every SDPA backend
#   7. math               sdpa_math, causal forward, N=1K..8K
# Shape of the performance stages: bf16, B=1, Hq=32, Hkv=8, D=128. Triton autotunes over the
# fixed, pruned list CHECK_SPACE (kernels/triton_configs.py, CTXBENCH_TRITON_SPACE=check);
# the checks use its default configurations (no autotuning).
#
# usage: benchmarks/gpu_check.sh OUTDIR [--dry-run]
#   On the device tool: benchmarks/gpu_check.sh $OUT/gc   (everything lands in $OUT/gc)
#   --dry-run runs the same code paths on the CPU at tiny sizes (Triton through its interpreter;
#   its last stage gets a budget too small to finish, so the stop path runs too).
# Needs no network and nothing beyond the GPU image (torch, triton, click, rich, psutil, pandas,
# scipy, seaborn; no gguf, flash_attn or model): ctxbench is installed from this checkout, offline.
# GPU_CHECK_BUDGET_S (default 440) is the time for all stages together; installing ctxbench and
# the summary at the end take about 20 s more, so the whole run stays within 8 minutes.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR [--dry-run]}
DRY=${2:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
T0=$(date +%s)
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

# A stage: NAME BUDGET_S then ctxbench sweep arguments.
STAGES=()
stage() { STAGES+=("$*"); }

if [ "$DRY" = "--dry-run" ]; then
  DEV=(--device cpu --allow-interpreter --rep-ms 2 --timeout 300 --ppl-max-len 0)
  BUDGET=${GPU_CHECK_BUDGET_S:-1500}
  # as few heads and rows as still take every branch (GQA, N not a multiple of the interpreter's
  # 16-row blocks, padded head dims): the interpreter's time grows with the programs launched
  SHAPE="--batch 1 --heads 2 --kv-heads 1 --head-dim 32 --dtype bf16"
  LONG=16,32; SHORT=16; MATH=16; CHECK_N=17; W=8
  VS=triton,sdpa,flash_attn; ALL_SDPA=sdpa; WIN=triton,sdpa; MATH_IMPLS=sdpa
  CHECK_IMPLS=triton,naive,chunked,sliding_window,sdpa,flash_attn; ENGINES=flex,flashinfer,xformers,sdpa
  CHECK=("--dtype fp32 --mask causal --heads 1 --kv-heads 1 --head-dim 16"
         "--dtype bf16 --mask window --window 5 --heads 2 --kv-heads 1 --head-dim 32"
         "--dtype bf16 --mask none --heads 2 --kv-heads 1 --head-dim 20"
         "--dtype fp32 --mask window --window 5 --sinks 3 --heads 2 --kv-heads 1 --head-dim 16")
  DSHAPE="--batch 3 --heads 4 --kv-heads 2 --head-dim 32 --dtype bf16"; DLENS=16,32; DEC_IMPLS=triton_decode,sdpa,chunked
  B_DEC=300; B_LONG=300; B_CHECK=300; B_FWDBWD=300; B_WIN=300; B_FUSED=300; B_SHORT=300; B_ENGINES=300
  # the last stage cannot finish in its budget: the stop path runs in every dry run
  B_MATH=8; MATH=16,32,48,64,80,96,112,128,144,160,176,192,208,224,240,256; MATH_IMPLS=triton
elif [ -n "$DRY" ]; then
  echo "usage: benchmarks/gpu_check.sh OUTDIR [--dry-run]" >&2; exit 2
else
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_check: torch sees no CUDA device; use --dry-run on a CPU" >&2; exit 2; }
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv" 2>/dev/null || true
  DEV=(--device cuda --timeout 120 --ppl-max-len 0)
  BUDGET=${GPU_CHECK_BUDGET_S:-440}
  SHAPE="--batch 1 --heads 32 --kv-heads 8 --head-dim 128 --dtype bf16"
  LONG=8192,16384,32768; SHORT=1024,2048,4096; MATH=1024,2048,4096,8192; CHECK_N=1000; W=4096
  VS=triton,sdpa_flash,sdpa_cudnn,flash_attn; ALL_SDPA=triton,sdpa_flash,sdpa_cudnn,sdpa_efficient
  WIN=triton,sdpa_efficient,flash_attn; MATH_IMPLS=sdpa_math
  # every implementation but flex, whose compilation would eat the checks' budgets (it has its own)
  CHECK_IMPLS=triton,naive,chunked,sliding_window,sdpa,sdpa_flash,sdpa_efficient,sdpa_cudnn,sdpa_math,flash_attn,flashinfer,xformers
  ENGINES=flex,flashinfer,xformers,sdpa_flash
  CHECK=("--dtype fp32 --mask causal --heads 8 --kv-heads 8 --head-dim 64"
         "--dtype bf16 --mask window --window 256 --heads 32 --kv-heads 8 --head-dim 128"
         "--dtype bf16 --mask none --heads 8 --kv-heads 2 --head-dim 80"
         "--dtype bf16 --mask window --window 256 --sinks 4 --heads 8 --kv-heads 2 --head-dim 64")
  DSHAPE="--batch 8 --heads 32 --kv-heads 8 --head-dim 128 --dtype bf16"; DLENS=4096,32768,131072
  DEC_IMPLS=triton_decode,sdpa,chunked
  # Budgets (s): the compile estimate below plus a few seconds per cell and per worker start.
  B_DEC=45; B_LONG=90; B_CHECK=40; B_FWDBWD=60; B_WIN=40; B_FUSED=40; B_SHORT=30; B_MATH=30; B_ENGINES=50
fi

stage causal-fwd-long $B_LONG $SHAPE --mask causal --mode fwd --lengths $LONG --impls $VS
stage decode $B_DEC $DSHAPE --mask causal --query-len 1 --ragged --lengths $DLENS --impls $DEC_IMPLS
stage decode-paged $B_DEC $DSHAPE --mask causal --query-len 1 --ragged --page-size 16 --lengths $DLENS --impls $DEC_IMPLS
i=0
for c in "${CHECK[@]}"; do
  i=$((i + 1))
  # fp32 (IEEE) kernels are the slow ones to compile: that check gets half as much again
  budget=$B_CHECK; [[ $c == *fp32* ]] && budget=$((B_CHECK * 3 / 2))
  stage check$i $budget $c --mode fwd+bwd --lengths $CHECK_N --rep-ms 5 --impls $CHECK_IMPLS
done
stage causal-fwdbwd-long $B_FWDBWD $SHAPE --mask causal --mode fwd+bwd --lengths $LONG --impls $VS
stage engines-check $B_ENGINES ${CHECK[1]} --mode fwd+bwd --lengths $CHECK_N --rep-ms 5 --impls $ENGINES
stage engines-fwd-long $B_ENGINES $SHAPE --mask causal --mode fwd --lengths $LONG --impls $ENGINES
stage window-fwd-long $B_WIN $SHAPE --mask window --window $W --mode fwd --lengths $LONG --impls $WIN
stage window-fwdbwd-long $B_WIN $SHAPE --mask window --window $W --mode fwd+bwd --lengths $LONG --impls $WIN
stage causal-fwdbwd-long-fuseddq $B_FUSED $SHAPE --mask causal --mode fwd+bwd --lengths $LONG --impls triton
stage causal-fwd-short $B_SHORT $SHAPE --mask causal --mode fwd --lengths $SHORT --impls $ALL_SDPA
stage math $B_MATH $SHAPE --mask causal --mode fwd --lengths $MATH --impls $MATH_IMPLS

# Autotune timings are cached on disk, so the fwd and fwd+bwd stages (separate processes)
# don't tune the same forward shapes twice; the checks use fixed configurations.
export TRITON_CACHE_AUTOTUNING=1
export CTXBENCH_TRITON_SPACE=check

# The estimate: compile times of every kernel the check compiles (kernel_stats on a CPU, the
# committed CSV) plus the stage budgets (the most the stages may take).
budgets=0
for s in "${STAGES[@]}"; do read -r _ b _ <<< "$s"; budgets=$((budgets + b)); done
$PY - "$ROOT/results/kernels" "$BUDGET" "${#STAGES[@]}" "$budgets" <<'EOF' | tee "$OUT/stages.txt"
import csv, glob, os, sys
folder, budget, stages, budgets = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
paths = sorted(glob.glob(os.path.join(folder, "gpu-check-compile-*.csv")))
try:
    rows = [r for p in paths for r in csv.DictReader(open(p))]
    wall = sum(float(r["compile_s"]) for r in rows)
    cpu = sum(float(r["compile_cpu_s"]) for r in rows)
    print(f"gpu_check estimate: compiling the {len(rows)} Triton kernels it launches takes about {cpu:.0f} s "
          f"of CPU ({wall:.0f} s wall on the machine that measured it: {', '.join(map(os.path.basename, paths))}); "
          f"{stages} stages budgeted {budgets} s, run within {budget} s in all (later stages get what is left)")
except (OSError, KeyError, ValueError) as exc:
    print(f"gpu_check estimate: no compile estimate ({exc}); {stages} stages budgeted {budgets} s, "
          f"run within {budget} s in all")
EOF

deadline=$(( $(date +%s) + BUDGET ))
for s in "${STAGES[@]}"; do
  read -r name budget args <<< "$s"
  now=$(date +%s)
  left=$(( deadline - now ))
  [ "$budget" -gt "$left" ] && budget=$left
  if [ "$budget" -lt 5 ]; then
    echo "== $name: skipped, ${left} s left of the ${BUDGET} s budget" | tee -a "$OUT/stages.txt"
    continue
  fi
  echo "== $name (budget ${budget} s): $args"
  autotune=1; [[ $name == check* ]] && autotune=0
  fused=${CTXBENCH_TRITON_FUSED_DQ:-auto}; [[ $name == *-fuseddq ]] && fused=1
  # shellcheck disable=SC2086
  CTXBENCH_TRITON_AUTOTUNE=$autotune CTXBENCH_TRITON_FUSED_DQ=$fused timeout --signal=INT --kill-after=20 "$budget" \
    $PY -m ctxbench sweep "${DEV[@]}" $args --out "$OUT" --run-id "$name" > "$OUT/$name.log" 2>&1
  rc=$?
  took=$(( $(date +%s) - now ))
  cells=$( [ -f "$OUT/$name/results.csv" ] && $PY -c "import csv,sys; print(sum(1 for _ in csv.DictReader(open(sys.argv[1]))))" "$OUT/$name/results.csv" || echo 0)
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    verdict="STOPPED at its budget of ${budget} s (the ${cells} cells finished are kept)"
  elif [ "$rc" = 0 ]; then
    verdict="done, ${cells} cells"
  else
    verdict="exited $rc, ${cells} cells (see $name.log)"
  fi
  echo "== $name: $verdict; ${took} s, $(( $(date +%s) - T0 )) s since start" | tee -a "$OUT/stages.txt"
done
echo "== stages took $(( $(date +%s) - T0 )) s" | tee -a "$OUT/stages.txt"
$PY "$ROOT/benchmarks/gpu_summary.py" "$OUT"
