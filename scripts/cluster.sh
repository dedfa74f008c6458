#!/usr/bin/env bash
# A local cluster: one redis-server (no persistence, in a temp dir) and N switchboard nodes on
# consecutive ports, all on loopback. Stopped by pid.
#
#   scripts/cluster.sh up [N] [-- extra switchboard flags]   # default N=3, ports 8081..
#   scripts/cluster.sh down
#
# Environment: SB_CLUSTER_DIR (state, logs; default /tmp/switchboard-cluster),
# SB_BIN (default target/release/switchboard), SB_BASE_PORT (default 8081),
# SB_REDIS_PORT (default 6399), SB_REDIS_MASTERS (default 1: one plain Redis; M > 1: a Redis
# Cluster of M masters on ports SB_REDIS_PORT.., slots split evenly, no replicas),
# SB_REDIS_REPLICAS (default 0; with one plain Redis, that many replicas on ports
# SB_REDIS_PORT+100.., for --broker-min-replicas).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${SB_CLUSTER_DIR:-/tmp/switchboard-cluster}
BIN=${SB_BIN:-target/release/switchboard}
BASE=${SB_BASE_PORT:-8081}
RPORT=${SB_REDIS_PORT:-6399}

wait_for() { # what, command...
  local what=$1; shift
  for _ in $(seq 1 100); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "cluster: $what did not come up (see $DIR)" >&2
  return 1
}

stop_pid() { # file
  local f=$1 pid
  pid=$(cat "$f" 2>/dev/null || true)
  rm -f "$f"
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

case "${1:-}" in
  up)
    shift
    N=3
    if [ $# -gt 0 ] && [ "$1" != "--" ]; then N=$1; shift; fi
    [ "${1:-}" = "--" ] && shift
    command -v redis-server >/dev/null || { echo "cluster: redis-server is missing (apt-get install redis-server)" >&2; exit 1; }
    [ -x "$BIN" ] || cargo build --release --bin switchboard
    if ls "$DIR"/*.pid >/dev/null 2>&1; then
      echo "cluster: already up in $DIR (scripts/cluster.sh down first)" >&2
      exit 1
    fi
    mkdir -p "$DIR"
    MASTERS=${SB_REDIS_MASTERS:-1}
    if [ "$MASTERS" -le 1 ]; then
      redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$DIR" \
        >"$DIR/redis.log" 2>&1 &
      echo $! >"$DIR/redis.pid"
      wait_for "redis-server on $RPORT" redis-cli -p "$RPORT" ping
      for r in $(seq 1 "${SB_REDIS_REPLICAS:-0}"); do
        p=$((RPORT + 99 + r))
        rm -rf "$DIR/replica$r" && mkdir -p "$DIR/replica$r"
        redis-server --port "$p" --bind 127.0.0.1 --save '' --appendonly no --dir "$DIR/replica$r" \
          --replicaof 127.0.0.1 "$RPORT" >"$DIR/replica$r.log" 2>&1 &
        echo $! >"$DIR/redis-replica$r.pid"
        linked() { redis-cli -p "$1" info replication | grep -q 'master_link_status:up'; }
        wait_for "replica on $p" linked "$p"
      done
    else
      per=$((16384 / MASTERS))
      for m in $(seq 0 $((MASTERS - 1))); do
        p=$((RPORT + m))
        rm -rf "$DIR/redis$m" && mkdir -p "$DIR/redis$m"
        redis-server --port "$p" --bind 127.0.0.1 --save '' --appendonly no --dir "$DIR/redis$m" \
          --cluster-enabled yes --cluster-config-file nodes.conf \
          --cluster-require-full-coverage no >"$DIR/redis$m.log" 2>&1 &
        echo $! >"$DIR/redis$m.pid"
        wait_for "redis-server on $p" redis-cli -p "$p" ping
        from=$((m * per)); to=$(( m == MASTERS - 1 ? 16383 : (m + 1) * per - 1 ))
        redis-cli -p "$p" cluster addslotsrange "$from" "$to" >/dev/null
        [ "$m" -gt 0 ] && redis-cli -p "$RPORT" cluster meet 127.0.0.1 "$p" >/dev/null
      done
      cluster_ok() {
        for m in $(seq 0 $((MASTERS - 1))); do
          redis-cli -p $((RPORT + m)) cluster info | grep -q "cluster_size:$MASTERS" || return 1
          redis-cli -p $((RPORT + m)) cluster info | grep -q 'cluster_state:ok' || return 1
        done
      }
      wait_for "the Redis Cluster" cluster_ok
    fi
    for i in $(seq 1 "$N"); do
      port=$((BASE + i - 1))
      "$BIN" --listen "127.0.0.1:$port" --broker "redis://127.0.0.1:$RPORT" --node-id "node$i" \
        --data-dir "$DIR/node$i" "$@" >"$DIR/node$i.log" 2>&1 &
      echo $! >"$DIR/node$i.pid"
    done
    for i in $(seq 1 "$N"); do
      port=$((BASE + i - 1))
      wait_for "node$i on $port" curl -sf "http://127.0.0.1:$port/healthz"
      echo "node$i  ws://127.0.0.1:$port/ws  (log $DIR/node$i.log)"
    done
    echo "redis  redis://127.0.0.1:$RPORT  ($MASTERS master(s))"
    ;;
  down)
    for f in "$DIR"/node*.pid; do [ -e "$f" ] && stop_pid "$f"; done
    for f in "$DIR"/redis*.pid; do [ -e "$f" ] && stop_pid "$f"; done
    echo "cluster: down"
    ;;
  *)
    sed -n '2,13p' "$0"
    exit 2
    ;;
esac
