#!/usr/bin/env bash
# Run the whole test suite N times (default 5) and print which tests failed how often.
#   tools/soak_tests.sh 5            # five runs on a quiet machine
#   HOGS=2 tools/soak_tests.sh 3     # three runs beside two CPU-bound processes
# Extra arguments go to pytest (e.g. a test path to soak one file). Each run's log is kept
# in $SOAK_DIR (default runs/soak/<time>); the exit code is 1 when any run failed.
set -eo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RUNS="${1:-5}"
shift || true
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [RUNS] [pytest args...]" >&2; exit 2; }
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
SOAK_DIR="${SOAK_DIR:-$ROOT/runs/soak/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$SOAK_DIR"
bash tools/setup.sh >/dev/null
. ./env.sh

hogs=()
cleanup() { ((${#hogs[@]})) && kill "${hogs[@]}" 2>/dev/null; true; }
trap cleanup EXIT
for ((h = 0; h < ${HOGS:-0}; h++)); do
  python3 -c 'while 1: pass' &
  hogs+=($!)
done

passed=0
for ((run = 1; run <= RUNS; run++)); do
  log="$SOAK_DIR/run$run.log"
  start=$(date +%s)
  if python -m pytest -q -p no:cacheprovider -rfE "$@" >"$log" 2>&1; then
    passed=$((passed + 1)); verdict=passed
  else
    verdict=FAILED
  fi
  printf 'run %d/%d: %s in %ds (%s)\n' "$run" "$RUNS" "$verdict" $(( $(date +%s) - start )) \
    "$(tail -n 1 "$log")"
done

echo "soak: $passed of $RUNS runs passed (hogs: ${HOGS:-0}; logs in $SOAK_DIR)"
# pytest -rfE prints 'FAILED path::test - reason' / 'ERROR path::test - reason' per problem.
failures=$(grep -h -E '^(FAILED|ERROR) ' "$SOAK_DIR"/run*.log | cut -d' ' -f1,2 | sort \
  | uniq -c | sort -rn || true)
if [[ -n "$failures" ]]; then
  echo 'tests that failed (times, kind, test):'
  echo "$failures"
fi
((passed == RUNS))
