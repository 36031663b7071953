#!/usr/bin/env bash
# The Triton test job: the kernel's interpreter tests (tests/test_triton.py, default suite) and
# its sm_90 compile tests (`-m slow -k sm90`, no GPU needed) under triton 3.6 (the version the
# GPU image runs) and under the current one. Not part of .ci/run (the compile tests take tens of
# minutes on 2 cores).
#
# usage: benchmarks/triton_versions.sh [--no-compile] [VERSION ...]
#   VERSION: a triton release for a venv of its own (default: 3.6.0), or "current" for the
#   python on PATH as it is (default: both, "3.6.0 current").
#   --no-compile: the interpreter tests only (about 10 minutes per version on 2 cores).
# Environment: PYTHON (default python3), VENVS (default /tmp/ctxbench-triton: one venv per
# version, kept and reused), TORCH_SPEC (default: torch==<the current python's torch>, which
# must be a CPU build or one that does not pin triton), PYTEST_ARGS (extra pytest arguments).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
VENVS=${VENVS:-/tmp/ctxbench-triton}
COMPILE=1
VERSIONS=()
for arg in "$@"; do
  case $arg in
    --no-compile) COMPILE=0 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) VERSIONS+=("$arg") ;;
  esac
done
[ ${#VERSIONS[@]} -eq 0 ] && VERSIONS=(3.6.0 current)
TORCH_SPEC=${TORCH_SPEC:-torch==$($PY -c 'import torch; print(torch.__version__.split("+")[0])')}

python_for() {  # $1: version -> path of a python with that triton (creates the venv once)
  if [ "$1" = current ]; then command -v "$PY"; return; fi
  local venv="$VENVS/triton-$1"
  if ! "$venv/bin/python" -c "import triton, sys; sys.exit(triton.__version__ != '$1')" 2>/dev/null; then
    echo "== creating $venv ($TORCH_SPEC, triton==$1)" >&2
    "$PY" -m venv "$venv" >&2 || return 1
    "$venv/bin/pip" install -q "$TORCH_SPEC" "triton==$1" pytest >&2 || return 1
    "$venv/bin/pip" install -q -e "$ROOT" >&2 || return 1
  fi
  echo "$venv/bin/python"
}

cd "$ROOT"
status=0
summary=()
for version in "${VERSIONS[@]}"; do
  py=$(python_for "$version") || { summary+=("triton $version: venv failed"); status=1; continue; }
  real=$("$py" -c 'import triton, torch; print(f"triton {triton.__version__}, torch {torch.__version__}")')
  echo "== $real: interpreter tests"
  start=$(date +%s)
  # shellcheck disable=SC2086
  "$py" -m pytest -q -p no:cacheprovider tests/test_triton.py ${PYTEST_ARGS:-} 2>&1 | tee "/tmp/triton-$version-interp.log" | tail -3
  rc=${PIPESTATUS[0]}
  summary+=("$real, interpreter: $(tail -1 "/tmp/triton-$version-interp.log") [rc $rc, $(( $(date +%s) - start )) s]")
  [ "$rc" = 0 ] || status=1
  if [ "$COMPILE" = 1 ]; then
    echo "== $real: sm_90 compile tests"
    start=$(date +%s)
    # shellcheck disable=SC2086
    "$py" -m pytest -q -p no:cacheprovider -m slow -k sm90 tests/test_triton.py ${PYTEST_ARGS:-} 2>&1 \
      | tee "/tmp/triton-$version-sm90.log" | tail -3
    rc=${PIPESTATUS[0]}
    summary+=("$real, sm_90 compile: $(tail -1 "/tmp/triton-$version-sm90.log") [rc $rc, $(( $(date +%s) - start )) s]")
    [ "$rc" = 0 ] || status=1
  fi
done
echo "== summary (logs: /tmp/triton-<version>-{interp,sm90}.log)"
printf '%s\n' "${summary[@]}"
exit $status
