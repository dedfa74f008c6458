#!/bin/bash
# CPU per echoed message of this build against an older one, in alternating pairs (the
# tightest before/after this noisy machine gives: each pair runs back to back, so drift in
# the machine's load hits both sides alike).
#   scripts/flood-ab.sh BEFORE_BIN [pairs=5] [windows="1024 64"]
# BEFORE_BIN `uws`: native uWebSockets (benches/peers/uws-native/, built into
# target/uws-native) in place of the older build: the per-core comparison issue 32 asks for.
# Per pair and window: `switchboard --echo --shards 1` (the older binary, then this one),
# `loadgen flood` with 200 connections and that many messages in flight each (window `wc`:
# write-combined, `--write-combined`: send buffers kept full, tcpkali-style), 10 s; prints
# one line per run (who, window, pair, server CPU ns per message, echoed M msg/s) and the
# medians. A benchmark, not a test: CI does not run it.
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE=${1:?usage: scripts/flood-ab.sh BEFORE_BIN [pairs] [windows]}
PAIRS=${2:-5}
WINDOWS=${3:-1024 64}
PORT=${FLOOD_AB_PORT:-9301}
cargo build --release -q -p switchboard -p loadgen
AFTER=target/release/switchboard
LG=target/release/loadgen
OUT=$(mktemp -d /tmp/flood-ab.XXXXXX)
trap 'rm -rf "$OUT"' EXIT

if [ "$BEFORE" = uws ]; then
  BEFORE=$(benches/peers/uws-native/build.sh target/uws-native)
fi

run() { # who bin window pair
  local who=$1 bin=$2 w=$3 r=$4 dir="$OUT/$1-$3-$4"
  case $bin in
    */echo_uws) "$bin" $PORT >/dev/null 2>&1 & ;;
    *) "$bin" --echo --listen 127.0.0.1:$PORT --shards 1 --fd-table per-shard \
      --max-connections 6000 >/dev/null 2>&1 & ;;
  esac
  local pid=$!
  for _ in $(seq 200); do
    if (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; then break; fi
    sleep 0.05
  done
  local depth=(--window "$w")
  [ "$w" = wc ] && depth=(--write-combined)
  "$LG" flood --url ws://127.0.0.1:$PORT/ --connections 200 "${depth[@]}" --duration 10s \
    --server-pid "$pid" --out "$dir" >/dev/null 2>&1 || true
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  python3 - "$who" "$w" "$r" "$dir/summary.json" <<'EOF' | tee -a "$OUT/rows"
import json, sys
who, w, r, path = sys.argv[1:]
try:
    f = json.load(open(path))["flood"]
    print(who, w, r, round(f["server_cpu_ns_per_message"], 1), round(f["echoed_per_s"] / 1e6, 2))
except (OSError, ValueError, KeyError):
    print(who, w, r, "failed", "-")
EOF
}

for r in $(seq "$PAIRS"); do
  for w in $WINDOWS; do
    run before "$BEFORE" "$w" "$r"
    run after "$AFTER" "$w" "$r"
  done
done
python3 - "$OUT/rows" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
for w in sorted({r[1] for r in rows}, key=lambda w: int(w) if w.isdigit() else 1 << 30):
    med = {}
    for who in ("before", "after"):
        v = [float(r[3]) for r in rows if r[0] == who and r[1] == w and r[3] != "failed"]
        med[who] = statistics.median(v) if v else float("nan")
    print(f"window {w}: median CPU per message before {med['before']:.1f} ns, "
          f"after {med['after']:.1f} ns ({med['after'] / med['before'] - 1:+.1%})")
EOF
