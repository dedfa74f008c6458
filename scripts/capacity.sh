#!/usr/bin/env bash
# One-command capacity run: N concurrent WebSocket connections (default 1,000,000) held with
# heartbeats, server and loadgen on this host, then one report.
#
#   scripts/capacity.sh [N] [--hold SECONDS] [--dm RATE] [--broadcast] [--publish-every SECONDS]
#                       [--subscribe] [--tls] [--ping-ms MS] [--netns] [--out DIR] [--no-baseline]
#
# Checks the host (scripts/tune-host.sh), raises what the run needs and restores it afterwards
# (also on Ctrl-C), starts the server with enough shards for the fd limit, runs a plain-TCP
# baseline and then `loadgen connect` (or dm/fanout) with enough loopback source addresses,
# holds with pings flowing, and prints the report (scripts/capacity_report.py). --broadcast:
# every connection subscribes to one channel, one publisher publishes to it every 10 s
# (--publish-every: another interval; at 1M a publication takes about as long as 10 s here,
# so a longer one keeps publications from queueing behind each other). --subscribe: named
# users each subscribed to one channel, nothing published (their memory). --tls: wss:// with
# a self-signed ECDSA P-256 certificate made for the run (openssl), verified by loadgen.
# --ping-ms: the server's ping interval (default N/40 ms, at least 2 s: about 40k pings a
# second, what the machine sustains when it does nothing else).
# --netns: server and loadgen run in a network namespace made for the run, whose TCP
# established-connection hash table is sized for the run (net.ipv4.tcp_child_ehash_entries,
# Linux 6.1+; set for the namespace's creation, then restored). The host's table is sized at
# boot (262,144 buckets here): 2M sockets make chains of ~8 that every segment walks. On a
# host, the boot parameter thash_entries does the same (tuning/README.md).
# LOADGEN_ARGS: extra arguments for the loadgen run (e.g. "--spin-us 0"). SWITCHBOARD_BIN: the
# server binary to run (default target/release/switchboard; another build, side by side).
set -euo pipefail
cd "$(dirname "$0")/.."
n=1000000
hold=300
dm=""
broadcast=0
publish_every=10
subscribe=0
baseline=1
tls=0
ping_ms=""
netns=0
out=""
all_args=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --hold) hold=$2; shift 2 ;;
    --dm) dm=$2; shift 2 ;;
    --broadcast) broadcast=1; shift ;;
    --subscribe) subscribe=1; shift ;;
    --out) out=$2; shift 2 ;;
    --no-baseline) baseline=0; shift ;;
    --tls) tls=1; shift ;;
    --publish-every) publish_every=$2; shift 2 ;;
    --ping-ms) ping_ms=$2; shift 2 ;;
    --netns) netns=1; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    [0-9]*) n=$1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
out=${out:-target/capacity-$n}
if [ $netns = 1 ] && [ -z "${CAPACITY_IN_NETNS:-}" ]; then
  # Power of two, about two buckets per socket (server and loadgen: 2 sockets a connection).
  buckets=1024; while [ $buckets -lt $((n * 4)) ] && [ $buckets -lt 16777216 ]; do
    buckets=$((buckets * 2)); done
  knob=/proc/sys/net/ipv4/tcp_child_ehash_entries
  [ -w $knob ] || { echo "--netns needs root and Linux 6.1+ ($knob)" >&2; exit 1; }
  old=$(cat $knob)
  echo "== network namespace for the run: $buckets established-hash buckets ($knob, was $old)"
  echo "$buckets" >$knob
  trap 'echo "$old" >$knob && echo "restored $knob = $old"' EXIT
  trap 'exit 130' INT TERM
  rc=0
  CAPACITY_IN_NETNS=1 unshare --net -- "$0" "${all_args[@]}" || rc=$?
  exit $rc
fi
if [ -n "${CAPACITY_IN_NETNS:-}" ]; then
  ip link set lo up
  echo "== in a network namespace: $(cat /proc/sys/net/ipv4/tcp_ehash_entries) established-hash buckets"
fi
rm -rf "$out" && mkdir -p "$out"
[ -x target/release/switchboard ] && [ -x target/release/loadgen ] || cargo build --release --workspace --bins
server_bin=${SWITCHBOARD_BIN:-target/release/switchboard}

pids=()
tuned=0
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ $tuned = 1 ]; then
    echo "restoring kernel settings"
    TUNE_STATE="$out/tune.saved" scripts/tune-host.sh --revert || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== host check"
scripts/tune-host.sh --check | tee "$out/host-before.txt" || true
if [ "$n" -gt 50000 ] || [ $broadcast = 1 ]; then
  if [ -w /proc/sys/net/core/somaxconn ]; then
    echo "== raising kernel limits for the run (restored at the end)"
    TUNE_STATE="$out/tune.saved" scripts/tune-host.sh --apply >"$out/tune-apply.txt" && tuned=1
  else
    echo "warning: cannot write sysctls (not root?); running with the current settings" >&2
  fi
fi

nofile=$(ulimit -n)
per_table=$(( nofile - 200 ))
shards=$(( (n + per_table - 1) / per_table ))
cores=$(nproc)
[ "$shards" -lt "$cores" ] && shards=$cores
# Round up to a power of two for an even SO_REUSEPORT spread.
p=1; while [ $p -lt "$shards" ]; do p=$((p * 2)); done; shards=$p
# Heartbeats the machine can sustain: about 40k ping/pong exchanges per second at most.
if [ -z "$ping_ms" ]; then
  ping_ms=$(( n / 40 )); [ $ping_ms -lt 2000 ] && ping_ms=2000
fi
idle_ms=$(( ping_ms * 2 + 10000 ))
echo "== server: $shards shards (RLIMIT_NOFILE $nofile per private fd table), ping every ${ping_ms} ms, idle timeout ${idle_ms} ms"
tls_args=()
if [ $tls = 1 ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -keyout "$out/key.pem" -out "$out/cert.pem" -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -addext "basicConstraints=critical,CA:FALSE" \
    2>/dev/null
  tls_args=(--tls-cert "$out/cert.pem" --tls-key "$out/key.pem")
fi
RUST_LOG=warn "$server_bin" "${tls_args[@]}" --listen 127.0.0.1:0 --shards "$shards" --fd-table per-shard --store memory \
  --max-connections $((n + 1000)) --ping-interval-ms "$ping_ms" --idle-timeout-ms "$idle_ms" \
  --handshake-timeout-ms 600000 --shutdown-grace-ms 60000 >"$out/server.out" 2>"$out/server.log" &
server=$!
pids+=("$server")
for _ in $(seq 1 200); do addr=$(awk '/listening on/ {print $4; exit}' "$out/server.out"); [ -n "$addr" ] && break; sleep 0.1; done
[ -n "${addr:-}" ] || { echo "server did not start" >&2; cat "$out/server.log" >&2; exit 1; }
url="ws://$addr/ws"
lg_tls=()
inflight=20000
# A TLS handshake is CPU work on both sides: more in flight only queue up, each holding
# rustls's handshake state (~8 KiB) until its turn.
[ $tls = 1 ] && url="wss://$addr/ws" && lg_tls=(--ca-file "$out/cert.pem") && inflight=200

python3 scripts/kernel_sampler.py "$out/kernel.json" &
pids+=("$!")  # pids[1]: stopped once the WebSocket run is over
sleep 1

ips=$(( (n + 13999) / 14000 ))
scenario=(connect)
[ -n "$dm" ] && scenario=(dm --rate "$dm")
[ $broadcast = 1 ] && scenario=(fanout --channels 1 --publishers 1 --rate "$(awk -v s="$publish_every" 'BEGIN { print 1 / s }')")
[ $subscribe = 1 ] && scenario=(fanout --channels 1 --publishers 0 --rate 0.1)
echo "== ${scenario[*]}: $n connections from $ips source addresses, hold ${hold}s"
read -r -a lg_extra <<<"${LOADGEN_ARGS:-}"
target/release/loadgen "${scenario[@]}" "${lg_tls[@]}" "${lg_extra[@]}" --url "$url" --connections "$n" --connect-rate 1000000 \
  --max-inflight-handshakes "$inflight" --duration "${hold}s" --server-pid "$server" --out "$out/ws" \
  >"$out/ws.txt" 2>"$out/ws.progress" || true
tail -n 3 "$out/ws.progress" || true
cat "$out/ws.txt"
kill "${pids[1]}" 2>/dev/null || true

if [ $baseline = 1 ]; then
  # After the WebSocket run, so the server's memory figures are not touched by it; other
  # source addresses, so no port of the first run is still in TIME_WAIT.
  echo "== plain TCP baseline: $n connects, same pacing and spreading (source addresses 127.0.1.x)"
  target/release/loadgen tcp "${lg_tls[@]}" --url "$url" --connections "$n" --connect-rate 1000000 \
    --max-inflight-handshakes 20000 --source-ips "127.0.1.2-127.0.1.$((1 + ips))" \
    --duration 1s --out "$out/tcp" >"$out/tcp.txt" 2>"$out/tcp.progress" || true
  grep -E "^connections:" "$out/tcp.txt" || true
fi
sleep 1
python3 scripts/capacity_report.py "$out" "$n"
