#!/bin/bash
# A flame graph of switchboard (one shard, `--echo`) for each measure of scripts/compare.sh,
# written to docs/benchmarks/flame-<measure>.svg: where the server's CPU goes, kernel included.
#   scripts/flame.sh [measures="connect flood flood-deep flood-combined latency"]
# Per measure: a fresh `switchboard --echo --shards 1`, the measure's loadgen run beside it (as
# compare.sh runs it), and `perf record --call-graph dwarf` on the server for 5 s in the middle
# of the run (for connect, from just before loadgen starts: the 15,000 open in a third of a
# second, then the server idles); folded with inferno (`cargo install inferno` when it is missing). FLAME_OUT: another
# directory. Needs perf (Debian `linux-perf`) and perf_event_paranoid ≤ 1 (or root). A benchmark
# tool, not a test: CI does not run it.
set -euo pipefail
cd "$(dirname "$0")/.."
MEASURES=${1:-connect flood flood-deep flood-combined latency}
OUT=${FLAME_OUT:-docs/benchmarks}
PORT=${FLAME_PORT:-9321}
command -v perf >/dev/null || { echo "flame.sh needs perf (apt-get install linux-perf)" >&2; exit 1; }
if ! command -v inferno-flamegraph >/dev/null; then
  cargo install inferno --locked -q
  export PATH="$HOME/.cargo/bin:$PATH"
fi
cargo build --release -q -p switchboard -p loadgen
SB=target/release/switchboard
LG=target/release/loadgen
TMP=$(mktemp -d /tmp/flame.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUT"

for what in $MEASURES; do
  case $what in
    connect) args=(connect --connections 15000 --connect-rate 50000 --duration 10s); after=-1 ;;
    flood) args=(flood --connections 200 --window 64 --duration 12s); after=4 ;;
    flood-deep) args=(flood --connections 200 --window 1024 --duration 12s); after=4 ;;
    flood-combined) args=(flood --connections 200 --write-combined --duration 12s); after=4 ;;
    latency) args=(echo --connections 200 --rate 20000 --duration 12s); after=4 ;;
    *) echo "unknown measure $what" >&2; exit 2 ;;
  esac
  "$SB" --echo --listen 127.0.0.1:$PORT --shards 1 --fd-table per-shard --max-connections 20000 \
    >"$TMP/server.log" 2>&1 &
  pid=$!
  for _ in $(seq 200); do grep -q "listening on" "$TMP/server.log" && break; sleep 0.05; done
  record() {
    perf record -q -e cpu-clock -F 999 --call-graph dwarf,16384 -p "$pid" -o "$TMP/perf.data" \
      -- sleep "$1" >/dev/null 2>&1
  }
  if [ "$after" = -1 ]; then
    record 3 &
    rec=$!
    sleep 0.5
  fi
  "$LG" "${args[@]}" --url ws://127.0.0.1:$PORT/ --server-pid "$pid" --out "$TMP/$what" \
    >"$TMP/$what.log" 2>&1 &
  lg=$!
  if [ "$after" = -1 ]; then
    wait "$rec" || true
  else
    sleep "$after"
    record 5
  fi
  wait "$lg" || true
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  perf script -i "$TMP/perf.data" 2>/dev/null | inferno-collapse-perf >"$TMP/$what.folded"
  inferno-flamegraph --title "switchboard --echo --shards 1: $what ($(git rev-parse --short HEAD))" \
    --minwidth 0.2 <"$TMP/$what.folded" >"$OUT/flame-$what.svg"
  echo "$OUT/flame-$what.svg ($(wc -l <"$TMP/$what.folded") stacks; $(grep -E '^(flood|connections):' "$TMP/$what.log" | head -2 | tr '\n' ' '))"
done
