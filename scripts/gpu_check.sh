#!/usr/bin/env bash
# The one prepared command for the GPU machine (one H200, python3 + torch + triton + transformers; no Hydra,
# MLflow, PuLP, Optuna, psycopg, network or pip): the `gpu` tests, then the prefill, decode and end-to-end
# benchmarks of scripts/gpu_bench.py. Writes tests.csv, prefill.csv, decode.csv, e2e.csv and summary.md to $OUT.
#
#   bash scripts/gpu_check.sh           # on the GPU machine (about 5 minutes; capped at 6)
#   bash scripts/gpu_check.sh --dry     # rehearsal on a CPU machine: tiny shapes, meaningless times (or GPU_CHECK_DRY=1)
#   GPU_CHECK_PARTS=tests,decode bash scripts/gpu_check.sh   # a subset of tests,prefill,decode,e2e
#
# Exit status: 0 when every part ran and every row is ok; 1 when a part, a row or a test failed; 124 when the
# whole check ran past its cap (what was written by then stays in $OUT). PYTHON picks the interpreter (python3).
set -u
cd "$(dirname "$0")/.."

dry=${GPU_CHECK_DRY:-0}
for arg in "$@"; do
  case $arg in
    --dry) dry=1 ;;
    *) echo "gpu_check.sh: unknown argument $arg (expected --dry)" >&2; exit 2 ;;
  esac
done
if [ -z "${OUT:-}" ]; then
  if [ "$dry" = 1 ]; then OUT=$(mktemp -d -t gpu_check_dry.XXXXXX); else echo "gpu_check.sh: set OUT" >&2; exit 2; fi
fi
mkdir -p "$OUT"
export OUT GPU_CHECK_DRY=$dry
python=${PYTHON:-python3}

echo "gpu_check: $("$python" --version 2>&1), writing to $OUT, dry=$dry"
if [ "$dry" != 1 ] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi
# One cap for everything (the tests have their own 80 s inside); -k: a hung kernel is killed 10 s later.
timeout -k 10 360 "$python" scripts/gpu_bench.py --parts "${GPU_CHECK_PARTS:-tests,prefill,decode,e2e}"
status=$?
echo "gpu_check: exit $status; files in $OUT:"
ls -l "$OUT"
exit $status
