#!/bin/bash
# switchboard's echo mode side by side with the servers a user would pick instead:
# uWebSockets built natively (one thread on uSockets' epoll loop, from the sources vendored in
# benches/peers/uws-native/: the speed anchor), tokio-tungstenite, fastwebsockets (Rust, 2
# runtime threads each), node `ws` (one thread) and `uwebsockets-socketify` (the uWebSockets
# library PyPI's socketify ships, on libuv: slower than the native build); their echo servers
# live in benches/peers/. switchboard runs 2 shards, and 1 shard as `switchboard-1` (the
# one-thread comparison with uWebSockets and node `ws`).
#   scripts/compare.sh [runs=3]
# Per run, in an order that rotates from run to run, each server is started fresh for each
# measure (loadgen beside it on this host, loopback):
#   - idle memory per connection and time to open 15,000 (`loadgen connect`);
#   - flood: echoed msg/s and the server's CPU per message (`loadgen flood`, 200
#     connections, 64 in flight each, 32 B), and again with 1024 in flight each (`flood-deep`:
#     more frames per read and per write, so the kernel's per-call cost weighs less), and
#     write-combined (`flood-combined`: `--write-combined`, no window, send buffers kept full,
#     tcpkali-style);
#   - latency at a fixed 20,000 msg/s (`loadgen echo`, 200 connections): p50/p99/p99.9.
# Writes target/compare/results.jsonl, then docs/benchmarks.md and docs/benchmarks/*.svg
# (medians of the runs). A benchmark, not a test: CI does not run it.
# Before/after a change: COMPARE_BEFORE=<an older build's switchboard binary> adds
# `switchboard-before` and `switchboard-1-before`; COMPARE_SERVERS="a b ..." runs only those
# servers; either one leaves docs/benchmarks.md as it is (the report goes to
# target/compare/report.md).
# For CPU per message alone, before/after in alternating pairs: scripts/flood-ab.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
OUT=target/compare
CONNS=${COMPARE_CONNECTIONS:-15000}
mkdir -p "$OUT"
: >"$OUT/results.jsonl"

cargo build --release --workspace --bins
(cd benches/peers/rust && cargo build --release)
[ -d benches/peers/node/node_modules/ws ] || (cd benches/peers/node && npm ci --no-audit --no-fund)
SERVERS=(switchboard switchboard-1 tokio-tungstenite fastwebsockets node-ws)
if [ -n "${COMPARE_BEFORE:-}" ]; then
  SERVERS+=(switchboard-before switchboard-1-before)
fi
if [ -n "${COMPARE_SERVERS:-}" ]; then
  read -r -a SERVERS <<<"$COMPARE_SERVERS"
else
  if benches/peers/uws-native/build.sh target/uws-native >/dev/null; then
    SERVERS+=(uwebsockets)
  else
    echo "uWebSockets left out: benches/peers/uws-native/build.sh failed (see above)" >&2
  fi
  if benches/peers/uws/build.sh; then
    SERVERS+=(uwebsockets-socketify)
  else
    echo "uwebsockets-socketify left out: benches/peers/uws/build.sh failed (see above)" >&2
  fi
fi
case " ${SERVERS[*]} " in
  *" uwebsockets "*) benches/peers/uws-native/build.sh target/uws-native >/dev/null ;;
esac
PEERS=benches/peers/rust/target/release
LG=target/release/loadgen

# start NAME PORT: starts the server, sets PID once it answers on the port.
start() {
  local name=$1 port=$2
  case $name in
    switchboard | switchboard-1 | switchboard-before | switchboard-1-before)
      local shards=2 bin=target/release/switchboard
      case $name in switchboard-1*) shards=1 ;; esac
      case $name in *-before) bin=$COMPARE_BEFORE ;; esac
      "$bin" --echo --listen 127.0.0.1:$port --shards $shards \
        --fd-table per-shard --max-connections $((CONNS + 5000)) >"$OUT/$name.log" 2>&1 &
      ;;
    tokio-tungstenite) "$PEERS/tokio-tungstenite-echo" 127.0.0.1:$port 2 >"$OUT/$name.log" 2>&1 & ;;
    fastwebsockets) "$PEERS/fastwebsockets-echo" 127.0.0.1:$port 2 >"$OUT/$name.log" 2>&1 & ;;
    node-ws) node benches/peers/node/echo.js $port >"$OUT/$name.log" 2>&1 & ;;
    uwebsockets) target/uws-native/echo_uws $port >"$OUT/$name.log" 2>&1 & ;;
    uwebsockets-socketify) benches/peers/uws/target/uws-echo $port >"$OUT/$name.log" 2>&1 & ;;
  esac
  PID=$!
  for _ in $(seq 200); do
    case $name in
      # Ready once it says so: a probe connection would count as one the server accepted
      # before the run, and loadgen then gives no per-connection memory figure.
      switchboard*) if grep -q "listening on" "$OUT/$name.log" 2>/dev/null; then return 0; fi ;;
      *) if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then return 0; fi ;;
    esac
    sleep 0.05
  done
  echo "$name did not come up on $port" >&2
  cat "$OUT/$name.log" >&2
  exit 1
}

stop() {
  kill "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
}

# measure RUN NAME PORT MEASURE: one loadgen run against a fresh server; one JSON line.
measure() {
  local run=$1 name=$2 port=$3 what=$4 dir="$OUT/$2-$4-$1"
  start "$name" "$port"
  local url=ws://127.0.0.1:$port/
  case $what in
    connect) "$LG" connect --url "$url" --connections "$CONNS" --connect-rate 50000 \
      --duration 10s --server-pid "$PID" --out "$dir" >"$dir.log" 2>&1 || true ;;
    flood) "$LG" flood --url "$url" --connections 200 --window 64 --duration 15s \
      --server-pid "$PID" --out "$dir" >"$dir.log" 2>&1 || true ;;
    flood-deep) "$LG" flood --url "$url" --connections 200 --window 1024 --duration 15s \
      --server-pid "$PID" --out "$dir" >"$dir.log" 2>&1 || true ;;
    flood-combined) "$LG" flood --url "$url" --connections 200 --write-combined \
      --duration 15s --server-pid "$PID" --out "$dir" >"$dir.log" 2>&1 || true ;;
    latency) "$LG" echo --url "$url" --connections 200 --rate 20000 --duration 15s \
      --server-pid "$PID" --out "$dir" >"$dir.log" 2>&1 || true ;;
  esac
  stop
  python3 - "$run" "$name" "$what" "$dir/summary.json" >>"$OUT/results.jsonl" <<'EOF'
import json, sys
run, name, what, path = sys.argv[1:]
try:
    s = json.load(open(path))
except (OSError, ValueError):
    s = None
row = {"run": int(run), "server": name, "measure": what, "ok": s is not None}
if s:
    c = s["connections"]
    if what == "connect":
        row.update(established=c["established"], target=c["target"],
                   connect_seconds=c["connect_seconds"],
                   bytes_per_connection=s["server"]["bytes_per_connection"])
    elif what in ("flood", "flood-deep", "flood-combined"):
        row.update(echoed_per_s=s["flood"]["echoed_per_s"],
                   cpu_ns_per_message=s["flood"]["server_cpu_ns_per_message"])
    else:
        h = s["histograms"]["echo_rtt"]
        row.update(p50_us=h["p50"], p99_us=h["p99"], p999_us=h["p999"],
                   missing=s["messages"]["expected"] - s["messages"]["received"],
                   lateness_p99_us=s["histograms"]["send_lateness"]["p99"])
print(json.dumps(row))
EOF
  tail -1 "$OUT/results.jsonl"
}

for run in $(seq "$RUNS"); do
  n=${#SERVERS[@]}
  for i in $(seq 0 $((n - 1))); do
    name=${SERVERS[$(((i + run - 1) % n))]}
    port=$((9101 + (i + run - 1) % n))
    for what in connect flood flood-deep flood-combined latency; do
      measure "$run" "$name" "$port" "$what"
    done
  done
done
if [ -n "${COMPARE_BEFORE:-}${COMPARE_SERVERS:-}" ]; then
  python3 scripts/compare_report.py "$OUT/results.jsonl" "$OUT/report.md" "$OUT/svg"
else
  python3 scripts/compare_report.py "$OUT/results.jsonl" docs/benchmarks.md docs/benchmarks
fi
