#!/usr/bin/env bash
# Runs README's test command N times in a row (default 5) beside `stress-ng --cpu 2` (Debian's
# stress-ng), so a test that races with a busy machine shows up here before it shows up in CI.
# Reports every failure of every run and ends with one line per run; exit code 1 if any run
# failed.
#
#   scripts/test-under-load.sh [RUNS] [--out DIR]
#
# The load stops with the script (also on Ctrl-C). Each run's log is kept in DIR
# (default target/test-under-load).
set -uo pipefail
cd "$(dirname "$0")/.."

runs=5
out=target/test-under-load
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    [0-9]*) runs=$1; shift ;;
    *) echo "usage: $0 [RUNS] [--out DIR]" >&2; exit 2 ;;
  esac
done
if ! command -v stress-ng >/dev/null; then
  echo "test-under-load: needs stress-ng (apt-get install stress-ng)" >&2
  exit 2
fi
mkdir -p "$out"

# Two CPU hogs for the whole campaign, at normal priority: the tests get what is left.
# Bounded: it stops by itself after a day if this script is killed without its trap.
stress-ng --cpu 2 --timeout 86400s --quiet &
load=$!
trap 'kill $load 2>/dev/null; wait $load 2>/dev/null' EXIT

results=()
failures=0
for i in $(seq 1 "$runs"); do
  log=$out/run-$i.log
  echo "test-under-load: run $i of $runs (log: $log; load: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  t0=$SECONDS
  if bash scripts/test.sh >"$log" 2>&1; then
    results+=("run $i: passed in $((SECONDS - t0)) s")
  else
    failures=$((failures + 1))
    results+=("run $i: FAILED in $((SECONDS - t0)) s")
    # What failed: test.sh's summary and every failing test with its first lines.
    echo "--- run $i failures:" >&2
    sed -n '/step(s) FAILED:/,$p' "$log" >&2
    grep -E -A8 '^---- .* stdout ----|^test .* \.\.\. FAILED$|^FAILED:|error: test failed' "$log" | head -200 >&2
  fi
done
echo "test-under-load: $((runs - failures)) of $runs runs passed beside stress-ng --cpu 2" >&2
printf '  %s\n' "${results[@]}" >&2
[ "$failures" -eq 0 ]
