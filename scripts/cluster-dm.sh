#!/bin/bash
# Cross-node DMs at the given rates: three nodes (1 shard each) and one Redis on this host,
# 3000 connections spread over the nodes; prints latency, loss, Redis CPU and publish calls.
#   scripts/cluster-dm.sh 20000 60000 120000
# qos 1 with the streams in Redis (one EVALSHA per DM, its publishes inside; in a Redis
# Cluster one per inbox):
#   QOS=1 scripts/cluster-dm.sh 10000 40000
# On a Redis Cluster of M masters (sharded pub/sub; CPU and calls summed over the masters):
#   SB_REDIS_MASTERS=3 scripts/cluster-dm.sh 10000
# qos 1 acked only once a replica has it (one replica, --broker-min-replicas 1):
#   QOS=1 MIN_REPLICAS=1 scripts/cluster-dm.sh 10000
cd "$(dirname "$0")/.."
MASTERS=${SB_REDIS_MASTERS:-1}
ports() { for m in $(seq 0 $((MASTERS - 1))); do echo $((6399 + m)); done; }
cpu() { for p in $(ports); do redis-cli -p "$p" info cpu; done | awk -F: '/^used_cpu_(sys|user):/ {s+=$2} END {print s}'; }
calls() {
  for p in $(ports); do redis-cli -p "$p" info commandstats; done |
    grep -o "cmdstat_\(publish\|spublish\|evalsha\):calls=[0-9]*" |
    awk -F'[_:=]' '{n[$2]+=$4} END {for (k in n) printf "%s=%d ", k, n[k]}'
}
for r in "$@"; do
  QOS=${QOS:-0}
  if [ "$QOS" = 1 ]; then STORE=redis; else STORE=memory; fi
  MIN=${MIN_REPLICAS:-0}
  extra=()
  [ "$MIN" -gt 0 ] && extra=(--broker-min-replicas "$MIN")
  SB_REDIS_MASTERS=$MASTERS SB_REDIS_REPLICAS=$MIN bash scripts/cluster.sh up 3 -- --shards 1 --store $STORE "${extra[@]}" >/dev/null
  for p in $(ports); do redis-cli -p "$p" config resetstat >/dev/null; done
  c0=$(cpu)
  out=$(target/release/loadgen dm --url ws://127.0.0.1:8081/ws --url ws://127.0.0.1:8082/ws --url ws://127.0.0.1:8083/ws --connections 3000 --rate $r --duration 10s --qos $QOS --out /tmp/lgc 2>&1)
  c1=$(cpu)
  pubs=$(calls)
  p=$(echo "$out" | awk '/^(dm|ack)_latency/ {print $1, "p50", $5, "p99", $9, "p99.9", $11}' | tr '\n' ' ')
  m=$(echo "$out" | grep -o "missing [0-9]*.*errors [0-9]* ([0-9]* deliveries/s)")
  echo "rate $r: $p ms | $m | redis cpu $(echo "$c1 - $c0" | bc) s | $pubs"
  bash scripts/cluster.sh down >/dev/null
done
