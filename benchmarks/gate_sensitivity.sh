#!/usr/bin/env bash
# The regression gate's sensitivity (docs/reports.md, "The CI gate"): the real .ci/gate, RUNS times,
# in a clone of this checkout whose HEAD is one commit on top of it that plants FRACTION on chunked
# (benchmarks/plant_slowdown.py), or, with FRACTION 0, changes no kernel. Each run's output goes
# to OUTDIR/frac-FRACTION-run-I.txt and a line per run to OUTDIR/summary.txt.
#
#   benchmarks/gate_sensitivity.sh 0.10 5 /tmp/sensitivity     # about 4 minutes a run that fails
#
# ctxbench runs from the clone (PYTHONPATH) with the active environment's packages (its ctxbench command on PATH).
set -uo pipefail
if [ $# -ne 3 ]; then echo "usage: $0 FRACTION RUNS OUTDIR" >&2; exit 2; fi
command -v ctxbench > /dev/null || { echo "$0: no ctxbench command: activate the environment it is installed in" >&2; exit 2; }
frac=$1 runs=$2 out=$(mkdir -p "$3" && cd "$3" && pwd)
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
git clone -q "$here" "$work/clone" && cd "$work/clone" || exit 2
if [ "$frac" = 0 ]; then
  echo >> README.md
  git -c user.name=gate -c user.email=gate@localhost commit -qam "no kernel changed"
else
  python "$here/benchmarks/plant_slowdown.py" kernels/chunked.py "$frac"
  git -c user.name=gate -c user.email=gate@localhost commit -qam "chunked planted $frac slower"
fi
for i in $(seq 1 "$runs"); do
  s=$SECONDS
  CTXBENCH_GATE_DIR=$work/gate-$i CTXBENCH_CACHE=$work/cache PYTHONPATH=$work/clone .ci/gate \
    > "$out/frac-$frac-run-$i.txt" 2>&1
  rc=$?
  echo "frac=$frac run=$i exit=$rc wall=$((SECONDS - s))s" | tee -a "$out/summary.txt"
done
