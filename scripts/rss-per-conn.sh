#!/usr/bin/env bash
# Server RSS per idle connection: a fresh server, N idle connections from loadgen, RSS growth ÷ N.
# Usage: scripts/rss-per-conn.sh N [SHARDS] [extra loadgen args...]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-10000}; shards=${2:-8}; shift $(( $# >= 2 ? 2 : $# )) || true
out=${OUT:-target/rss-$n}
mkdir -p "$out"
RUST_LOG=warn target/release/switchboard --listen 127.0.0.1:0 --shards "$shards" --fd-table per-shard --store memory \
  >"$out/server.out" 2>"$out/server.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do addr=$(awk '/listening on/ {print $4; exit}' "$out/server.out"); [ -n "$addr" ] && break; sleep 0.1; done
sleep 0.5
rss0=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
target/release/loadgen connect --url "ws://$addr/ws" --connections "$n" --connect-rate 50000 \
  --duration 5s --server-pid "$pid" --out "$out" "$@" | tee "$out/loadgen.txt" >/dev/null
peak=$(python3 -c "import json;print(json.load(open('$out/summary.json'))['server']['rss_peak_bytes']//1024)")
echo "connections=$n shards=$shards server_rss_before_kib=$rss0 server_rss_peak_kib=$peak bytes_per_connection=$(( (peak - rss0) * 1024 / n ))"
