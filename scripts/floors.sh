#!/bin/bash
# switchboard against this machine's floors, side by side in one run: minimal C servers that
# do only the work measured (benches/peers/floors/, see its README).
#   scripts/floors.sh dm [N=100000] [rates="20000 50000"] [seconds=30]
#   scripts/floors.sh broadcast [N=1000000]
# dm: `loadgen dm` with N connections at each rate against `dmrelay -t 8` (a DM relay speaking
#   the part of switchboard's protocol loadgen uses), then against switchboard; DM latency
#   p50/p99/p99.9, delivered and missing, and each server's CPU.
# broadcast: N connections held (`loadgen connect`), then one message to every connection:
#   `wsd -t 64` (stdin `bcast`) against switchboard (`POST /api/broadcast`); the time from the
#   request to the last arrival at loadgen, the messages received, connect time and each
#   server's memory per connection (RSS peak minus RSS at start, over N).
# Raises kernel limits when N > 50,000 (scripts/tune-host.sh, restored at the end, Ctrl-C
# too). One line of JSON per server and measure in target/floors/results.jsonl, a table at
# the end. A benchmark, not a test: CI does not run it. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: scripts/floors.sh dm|broadcast [N] ...}
OUT=target/floors
mkdir -p "$OUT/bin"
for f in wsd dmrelay; do
  gcc -O2 -Wall -pthread -o "$OUT/bin/$f" "benches/peers/floors/$f.c"
done
cargo build --release -q -p switchboard -p loadgen
LG=target/release/loadgen
SB=${SWITCHBOARD_BIN:-target/release/switchboard}
PORT=${FLOORS_PORT:-9401}

case $what in
  dm) n=${2:-100000}; rates=${3:-20000 50000}; secs=${4:-30} ;;
  broadcast) n=${2:-1000000} ;;
  *) echo "unknown measure $what (dm or broadcast)" >&2; exit 2 ;;
esac

pids=()
tuned=0
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ $tuned = 1 ]; then
    echo "restoring kernel settings"
    TUNE_STATE="$OUT/tune.saved" scripts/tune-host.sh --revert || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if [ "$n" -gt 50000 ] && [ -w /proc/sys/net/core/somaxconn ]; then
  TUNE_STATE="$OUT/tune.saved" scripts/tune-host.sh --apply >"$OUT/tune-apply.txt" && tuned=1
fi

# Shards (switchboard) and threads (wsd): enough private fd tables for N, a power of two.
per_table=$(( $(ulimit -n) - 200 ))
shards=$(( (n + per_table - 1) / per_table )); [ "$shards" -lt "$(nproc)" ] && shards=$(nproc)
p=1; while [ $p -lt "$shards" ]; do p=$((p * 2)); done; shards=$p
# Every server pings after the same silence: switchboard's default, longer past 1M (about 40k
# pings a second, what this machine sustains beside the rest).
ping_ms=$(( n / 40 )); [ $ping_ms -lt 25000 ] && ping_ms=25000

# start_server NAME LOG: starts it on PORT, sets SERVER (pid) once it listens.
start_server() {
  local name=$1 log=$2
  case $name in
    dmrelay) "$OUT/bin/dmrelay" -p "$PORT" -t 8 -i "$((ping_ms / 1000))" >"$log" 2>&1 & ;;
    wsd)
      rm -f "$OUT/wsd.in" && mkfifo "$OUT/wsd.in"
      "$OUT/bin/wsd" -p "$PORT" -t "$shards" -i "$((ping_ms / 1000))" <"$OUT/wsd.in" >"$log" 2>&1 &
      exec 7>"$OUT/wsd.in" ;;
    switchboard)
      RUST_LOG=warn "$SB" --listen 127.0.0.1:$PORT --shards "$shards" --fd-table per-shard \
        --store memory --max-connections $((n + 1000)) --ping-interval-ms "$ping_ms" \
        --idle-timeout-ms $((ping_ms * 2 + 10000)) --handshake-timeout-ms 600000 >"$log" 2>&1 & ;;
  esac
  SERVER=$!
  pids+=("$SERVER")
  # Ready when it says so (a probe connection would count in switchboard's memory figure).
  local ready="listening on"
  [ "$name" = wsd ] && ready="^READY"
  for _ in $(seq 400); do
    case $name in
      dmrelay) if (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; then return 0; fi ;;
      *) grep -q "$ready" "$log" && return 0 ;;
    esac
    sleep 0.05
  done
  echo "$name did not start:" >&2; cat "$log" >&2; exit 1
}

stop_server() {
  [ "${1:-}" = wsd ] && exec 7>&-
  kill "$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
  PORT=$((PORT + 1)) # no wait for the last run's TIME_WAIT
}

# row MEASURE NAME DIR [T0_MS]: one JSON line from loadgen's summary.
row() {
  python3 - "$@" <<'EOF' | tee -a "$OUT/results.jsonl"
import json, sys
measure, name, d, *t0 = sys.argv[1:]
try:
    s = json.load(open(f"{d}/summary.json"))
except (OSError, ValueError):
    print(json.dumps({"measure": measure, "server": name, "ok": False})); sys.exit()
c, m, srv = s["connections"], s["messages"], s["server"]
r = {"measure": measure, "server": name, "ok": True, "connections": c["established"],
     "connect_seconds": c["connect_seconds"], "server_cpu_s": srv["cpu_seconds"]}
if measure.startswith("dm"):
    h = s["histograms"]["dm_latency"]
    r.update(rate=m["rate_target_per_s"], delivered=m["received"], missing=m["missing"],
             p50_ms=h["p50"] / 1000, p99_ms=h["p99"] / 1000, p999_ms=h["p999"] / 1000)
else:
    a = s.get("arrivals") or {}
    r.update(received=m["received"], bytes_per_connection=srv["bytes_per_connection"],
             broadcast_s=(a["last_unix_ms"] - float(t0[0])) / 1000 if a else None)
print(json.dumps(r))
EOF
}

if [ "$what" = dm ]; then
  for rate in $rates; do
    for name in dmrelay switchboard; do
      d="$OUT/dm-$rate-$name"
      start_server "$name" "$d.server.log"
      "$LG" dm --url ws://127.0.0.1:$PORT/ws --connections "$n" --rate "$rate" \
        --duration "${secs}s" --connect-rate 1000000 --max-inflight-handshakes 20000 \
        --server-pid "$SERVER" --out "$d" >"$d.txt" 2>"$d.progress" || true
      stop_server "$name"
      row "dm-$rate" "$name" "$d"
    done
  done
else
  for name in wsd switchboard; do
    d="$OUT/broadcast-$name"
    start_server "$name" "$d.server.log"
    # Held long enough for the broadcast to reach everyone (about 10 s at 1M here).
    "$LG" connect --url ws://127.0.0.1:$PORT/ws --connections "$n" --connect-rate 1000000 \
      --max-inflight-handshakes 20000 --duration 40s --server-pid "$SERVER" --out "$d" \
      >"$d.txt" 2>"$d.progress" &
    lg=$!
    pids+=("$lg")
    for _ in $(seq 600); do
      grep -q "open $n connecting 0" "$d.progress" 2>/dev/null && break
      kill -0 "$lg" 2>/dev/null || break
      sleep 0.5
    done
    sleep 2
    t0=$(date +%s%3N)
    if [ "$name" = wsd ]; then
      echo bcast >&7
    else
      curl -sS -X POST "http://127.0.0.1:$PORT/api/broadcast" -d '{"data":"x"}' >"$d.api" || true
    fi
    wait "$lg" || true
    stop_server "$name"
    row broadcast "$name" "$d" "$t0"
  done
fi

python3 - "$OUT/results.jsonl" "$what" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rows = [r for r in rows if r["measure"].startswith(sys.argv[2])][-8:]
for r in rows:
    print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
EOF
