#!/usr/bin/env bash
# The fault campaign (docs/chaos.md): two switchboard nodes on Redis, `loadgen dm --qos 1
# --audit` (a client that retries with the same id, moves between the nodes and resumes with
# `since`, then checks every acknowledged message reached its recipient and is stored once),
# and one fault a third of the way into the run. One line of results per scenario; exit 1 if
# any scenario lost or doubled an acknowledged message.
#
#   scripts/chaos.sh [--short] [scenario...]
#
# Scenarios: node-kill, redis-restart, pubsub-kill, partition, lagging-failover,
# cluster-failover (all by default). --short: 12 s of sends each (CI), else 30 s.
# Environment: CHAOS_RATE (DMs/s, default 1000), CHAOS_USERS (default 200),
# CHAOS_MIN_REPLICAS (lagging-failover's --broker-min-replicas, default 1; 0 shows what it
# promises without), SB_BIN (the server binary, default target/release/switchboard).
# Everything on loopback, in a temp dir, stopped by pid. Needs redis-server and redis-cli.
set -uo pipefail
cd "$(dirname "$0")/.."

RUN_S=30
if [ "${1:-}" = "--short" ]; then RUN_S=12; shift; fi
SCENARIOS=("$@")
[ ${#SCENARIOS[@]} -eq 0 ] && SCENARIOS=(node-kill redis-restart pubsub-kill partition lagging-failover cluster-failover)
RATE=${CHAOS_RATE:-1000}
USERS=${CHAOS_USERS:-200}
MIN=${CHAOS_MIN_REPLICAS:-1}
FAULT_AT=$((RUN_S / 3))
BIN=${SB_BIN:-target/release/switchboard}
LG=target/release/loadgen
FP=target/release/faultproxy
# Ports of the campaign (away from scripts/cluster.sh's).
NA=8181 NB=8182 R=6480 R2=6481 PX=6490 PXC=6491 S=26480 C0=6500

command -v redis-server >/dev/null || { echo "chaos: redis-server is missing (apt-get install redis-server)" >&2; exit 1; }
[ -x "$BIN" ] && [ -x "$LG" ] && [ -x "$FP" ] || cargo build --release --workspace --bins || exit 1

DIR=$(mktemp -d /tmp/sb-chaos.XXXXXX)
stop_all() {
  for f in "$DIR"/*.pid; do
    [ -e "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null
    rm -f "$f"
  done
  sleep 0.2
}
trap 'stop_all; rm -rf "$DIR"' EXIT

wait_for() { # what, command...
  local what=$1; shift
  for _ in $(seq 1 150); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "chaos: $what did not come up (see $DIR)" >&2
  return 1
}
# A redis-server without persistence unless args say so; replicas sync at once
# (`repl-diskless-sync-delay 0`, not Redis's 5 s wait for more replicas).
redis() { # name port [args...]
  local name=$1 port=$2; shift 2
  mkdir -p "$DIR/$name"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --dir "$DIR/$name" \
    --repl-diskless-sync-delay 0 "$@" >"$DIR/$name.log" 2>&1 &
  echo $! >"$DIR/$name.pid"
  disown
  wait_for "redis $name on $port" redis-cli -p "$port" ping
}
linked() { redis-cli -p "$1" info replication | grep -q master_link_status:up; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
node() { # name port broker-url [flags...]
  local name=$1 port=$2 url=$3; shift 3
  "$BIN" --listen "127.0.0.1:$port" --broker "$url" --node-id "$name" --store redis --shards 2 \
    --data-dir "$DIR/$name" "$@" >>"$DIR/$name.log" 2>&1 &
  echo $! >"$DIR/$name.pid"
  disown
  wait_for "node $name on $port" listening "$port"
}
kill9() { kill -9 "$(cat "$DIR/$1.pid")" 2>/dev/null; rm -f "$DIR/$1.pid"; }
proxy_say() { exec 3<>"/dev/tcp/127.0.0.1/$PXC"; echo "$1" >&3; read -r _ <&3; exec 3>&-; }

failed=()
now_ms() { echo $(($(date +%s%N) / 1000000)); }
# Set by a failover's fault: ms from the master's death until the nodes would find the
# promoted replica (Sentinel names it; in a Redis Cluster, it answers as master).
FAILOVER_MS=
# Starts the audit, waits FAULT_AT, runs the fault (a function), waits for the audit.
campaign() { # name fault-function
  local name=$1 fault=$2
  "$LG" dm --qos 1 --audit --url "ws://127.0.0.1:$NA/ws" --url "ws://127.0.0.1:$NB/ws" \
    --connections "$USERS" --rate "$RATE" --duration "${RUN_S}s" --drain 30s \
    --user-prefix "$name-" --out "$DIR/lg-$name" >"$DIR/$name.audit" 2>&1 &
  local lg=$!
  FAILOVER_MS=
  sleep "$FAULT_AT"
  "$fault"
  wait "$lg"
  local rc=$?
  local line
  line=$(grep '^audit:' "$DIR/$name.audit" | sed 's/^audit: //')
  if [ -n "$FAILOVER_MS" ]; then
    # The issue's bound for a failover: unavailable at most the failover time + 2 s.
    local longest
    longest=$(grep -o 'longest_unavailable_ms [0-9]*' <<<"$line" | cut -d' ' -f2)
    line="$line failover_ms $FAILOVER_MS"
    [ -n "$longest" ] && line="$line unavailable_beyond_failover_ms $((longest - FAILOVER_MS))"
  fi
  if [ $rc -eq 0 ]; then
    printf '%-17s PASS  %s\n' "$name" "$line"
  else
    printf '%-17s FAIL  %s\n' "$name" "${line:-$(tail -3 "$DIR/$name.audit")}"
    failed+=("$name")
    cp -r "$DIR" "/tmp/sb-chaos-failed-$name" 2>/dev/null
  fi
  stop_all
}

fault_node_kill() { kill9 a; sleep 2; node a $NA "redis://127.0.0.1:$R"; }
scenario_node_kill() {
  redis redis $R
  node a $NA "redis://127.0.0.1:$R"; node b $NB "redis://127.0.0.1:$R"
  campaign node-kill fault_node_kill
}

fault_redis_restart() {
  kill9 redis; sleep 1
  redis redis $R --appendonly yes --appendfsync always
}
scenario_redis_restart() {
  redis redis $R --appendonly yes --appendfsync always
  node a $NA "redis://127.0.0.1:$R"; node b $NB "redis://127.0.0.1:$R"
  campaign redis-restart fault_redis_restart
}

fault_pubsub_kill() {
  redis-cli -p $R client kill type pubsub >/dev/null
  sleep "$FAULT_AT"
  redis-cli -p $R client kill type pubsub >/dev/null
}
scenario_pubsub_kill() {
  redis redis $R
  node a $NA "redis://127.0.0.1:$R"; node b $NB "redis://127.0.0.1:$R"
  campaign pubsub-kill fault_pubsub_kill
}

fault_partition() { proxy_say partition; sleep $((RUN_S / 3)); proxy_say heal; }
scenario_partition() {
  redis redis $R
  "$FP" $PX $R $PXC >"$DIR/proxy.log" 2>&1 &
  echo $! >"$DIR/proxy.pid"
  disown
  wait_for "the proxy" redis-cli -p $PX ping
  # Node a reaches Redis through the proxy, node b directly.
  node a $NA "redis://127.0.0.1:$PX"; node b $NB "redis://127.0.0.1:$R"
  campaign partition fault_partition
}

# The replica stops receiving 3 s before the master dies (its AUTH made to fail, so its link
# stays down: a proxy in the replication path would be undone by Sentinel's
# +fix-slave-config), then Sentinel promotes it; the old master comes back empty and becomes
# its replica.
fault_lagging_failover() {
  redis-cli -p $R2 config set masterauth wrong >/dev/null
  redis-cli -p $R client kill type replica >/dev/null
  sleep 3
  kill9 master
  local t0
  t0=$(now_ms)
  # Over when Sentinel names the replica (the nodes ask Sentinel). Only then does the old
  # master come back: before, Sentinel would still name it, empty (a split brain that only
  # --broker-min-replicas survives, since its WAIT fails there).
  promoted() { redis-cli -p $S sentinel get-master-addr-by-name chaos | grep -qx $R2; }
  wait_for "the failover" promoted
  FAILOVER_MS=$(($(now_ms) - t0))
  redis master $R
}
scenario_lagging_failover() {
  redis master $R
  redis replica $R2 --replicaof 127.0.0.1 $R
  wait_for "the replica's sync" linked $R2
  mkdir -p "$DIR/sentinel"
  printf 'port %s\nbind 127.0.0.1\ndir %s\nsentinel monitor chaos 127.0.0.1 %s 1\nsentinel down-after-milliseconds chaos 1000\nsentinel failover-timeout chaos 4000\n' \
    $S "$DIR/sentinel" $R >"$DIR/sentinel/sentinel.conf"
  redis-server "$DIR/sentinel/sentinel.conf" --sentinel >"$DIR/sentinel.log" 2>&1 &
  echo $! >"$DIR/sentinel.pid"
  disown
  known() { redis-cli -p $S sentinel replicas chaos | grep -qx slave; }
  wait_for "the sentinel's view of the replica" known
  local url="redis+sentinel://127.0.0.1:$S/chaos"
  local more=()
  [ "$MIN" -gt 0 ] && more=(--broker-min-replicas "$MIN")
  node a $NA "$url" "${more[@]}"; node b $NB "$url" "${more[@]}"
  campaign lagging-failover fault_lagging_failover
}

fault_cluster_failover() {
  # c1's replica, found before the kill; the failover ends when it answers as master.
  local rep
  rep=$(redis-cli -p $((C0 + 1)) info replication | sed -n 's/^slave0:.*port=\([0-9]*\).*/\1/p')
  kill9 c1
  local t0
  t0=$(now_ms)
  promoted() { redis-cli -p "$rep" role | head -1 | grep -qx master; }
  wait_for "c1's replica to take over" promoted
  FAILOVER_MS=$(($(now_ms) - t0))
}
scenario_cluster_failover() {
  local addrs=()
  for i in 0 1 2 3 4 5; do
    redis "c$i" $((C0 + i)) --cluster-enabled yes --cluster-config-file nodes.conf \
      --cluster-node-timeout 2000 --cluster-require-full-coverage no
    addrs+=("127.0.0.1:$((C0 + i))")
  done
  redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >"$DIR/cluster-create.log" 2>&1
  ok() { for i in 0 1 2 3 4 5; do redis-cli -p $((C0 + i)) cluster info | grep -q cluster_state:ok || return 1; done; }
  wait_for "the Redis Cluster" ok
  # Every replica linked before the fault (else the failover has nothing to promote).
  synced() { [ "$(for i in 0 1 2 3 4 5; do redis-cli -p $((C0 + i)) info replication; done | grep -c master_link_status:up)" -eq 3 ]; }
  wait_for "the replicas' sync" synced
  node a $NA "redis://127.0.0.1:$C0"; node b $NB "redis://127.0.0.1:$C0"
  campaign cluster-failover fault_cluster_failover
}

echo "chaos: ${#SCENARIOS[@]} scenario(s), ${RUN_S} s of sends each at $RATE DMs/s between $USERS users, fault at ${FAULT_AT} s (logs: $DIR)"
for s in "${SCENARIOS[@]}"; do
  fn="scenario_${s//-/_}"
  if ! declare -f "$fn" >/dev/null; then
    echo "chaos: no scenario $s" >&2
    failed+=("$s")
    continue
  fi
  "$fn"
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "chaos: FAILED: ${failed[*]} (copies of their logs in /tmp/sb-chaos-failed-*)" >&2
  exit 1
fi
echo "chaos: every scenario passed"
