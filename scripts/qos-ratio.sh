#!/bin/bash
# The highest DM rate with no loss, qos 0 against qos 1, measured side by side (issue 10's
# "qos-1 at least 50 % of qos 0"). Each round bisects both rates on a fresh server (2 shards,
# redb on a fresh data dir), qos 0 and qos 1 alternating; prints each round and the medians.
#   scripts/qos-ratio.sh [rounds=3] [server binary=target/release/switchboard]
# A rate passes when loadgen reports 0 missing (nothing refused, nothing lost) over 10 s with
# 2000 connections; bisection stops at 10k/s. loadgen shares the machine with the server.
set -u
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
BIN=${2:-target/release/switchboard}
LG=target/release/loadgen
PORT=${PORT:-9301}
WORK=$(mktemp -d /tmp/qos-ratio.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# run QOS RATE: 0 when nothing was missing; prints one line.
run() {
  local qos=$1 rate=$2
  rm -rf "$WORK/data"
  "$BIN" --listen 127.0.0.1:$PORT --shards 2 --data-dir "$WORK/data" --max-connections 10000 \
    >"$WORK/server.log" 2>&1 &
  local sp=$!
  for _ in $(seq 100); do curl -sf 127.0.0.1:$PORT/healthz >/dev/null && break; sleep 0.05; done
  "$LG" dm --url ws://127.0.0.1:$PORT/ws --connections 2000 --rate "$rate" --duration 10s \
    --qos "$qos" --server-pid $sp --out "$WORK/out" >"$WORK/lg.log" 2>&1
  kill $sp; wait $sp 2>/dev/null
  local missing p99
  missing=$(grep -o "missing [0-9]*" "$WORK/lg.log" | head -1 | awk '{print $2}')
  p99=$(awk '/^dm_latency/ {print $9}' "$WORK/lg.log")
  echo "  qos $qos at $rate/s: missing ${missing:-?}, end-to-end p99 ${p99:-?} ms" >&2
  [ "${missing:-1}" = 0 ]
}

# bisect QOS LO HI: the highest passing rate in [LO, HI] to 10k/s.
bisect() {
  local qos=$1 lo=$2 hi=$3 mid
  while [ $((hi - lo)) -gt 10000 ]; do
    mid=$(((lo + hi) / 2 / 5000 * 5000))
    if run "$qos" "$mid"; then lo=$mid; else hi=$mid; fi
  done
  echo "$lo"
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

: >"$WORK/q0"
: >"$WORK/q1"
for r in $(seq "$ROUNDS"); do
  q0=$(bisect 0 100000 500000)
  q1=$(bisect 1 50000 400000)
  echo "round $r: qos 0 $q0/s, qos 1 $q1/s ($((q1 * 100 / q0)) %)"
  echo "$q0" >>"$WORK/q0"
  echo "$q1" >>"$WORK/q1"
done
m0=$(median <"$WORK/q0")
m1=$(median <"$WORK/q1")
echo "median: qos 0 $m0/s, qos 1 $m1/s, ratio $((m1 * 100 / m0)) %"
