#!/bin/bash
# Broadcast to 300k connections: one node (32 shards) against three nodes (16 shards each),
# back to back on this host. Needs redis-server; raises nothing (tcp_mem default fits 300k).
# SB_REDIS_MASTERS=3: the three nodes share a Redis Cluster of three masters instead.
cd "$(dirname "$0")/.."
LG="target/release/loadgen fanout --connections 300000 --channels 1 --publishers 1 --rate 0.2 --duration 15s"
target/release/switchboard --listen 127.0.0.1:8090 --shards 32 --store memory > /tmp/one.log 2>&1 &
P=$!; sleep 1
echo "== one node"; timeout 200 $LG --url ws://127.0.0.1:8090/ws --out /tmp/bc-one 2>&1 | grep -E "^(fanout_latency|messages)"
kill $P; wait $P; sleep 5
bash scripts/cluster.sh up 3 -- --shards 16 --store memory >/dev/null
PORTS=$(seq 6399 $((6399 + ${SB_REDIS_MASTERS:-1} - 1)))
for p in $PORTS; do redis-cli -p "$p" config resetstat >/dev/null; done
echo "== three nodes"; timeout 200 $LG --url ws://127.0.0.1:8081/ws --url ws://127.0.0.1:8082/ws --url ws://127.0.0.1:8083/ws --out /tmp/bc-three 2>&1 | grep -E "^(fanout_latency|messages)"
for p in $PORTS; do redis-cli -p "$p" info commandstats; done | grep -o "cmdstat_s\?publish:calls=[0-9]*"
bash scripts/cluster.sh down >/dev/null
