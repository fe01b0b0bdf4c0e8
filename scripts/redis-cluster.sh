#!/usr/bin/env bash
# Starts and stops a real Redis Cluster of redis-server processes on loopback, for the tests,
# the benchmark and `make cluster-demo`.
#
#   scripts/redis-cluster.sh up DIR BASEPORT [MASTERS] [REPLICAS]
#   scripts/redis-cluster.sh down DIR
#   scripts/redis-cluster.sh start-node DIR PORT      (restart one node from its own config)
#
# `up` starts MASTERS * (1 + REPLICAS) nodes on ports BASEPORT.. (each also uses PORT+10000 for
# the cluster bus), forms the cluster and returns once every node says cluster_state:ok and every
# replica's link to its master is up (so `WAIT 1` can succeed at once). Masters are durable:
# appendonly yes + appendfsync always (the master fsyncs its AOF before it replies).
# `down` stops every node it finds under DIR (SIGCONT first, so a SIGSTOPped node also exits),
# and waits until none is left.
#
# Environment: REDIS_NODE_TIMEOUT (ms, default 2000), REDIS_MAXMEMORY (e.g. 64mb, default none).
set -euo pipefail

usage() {
  echo "usage: $0 up DIR BASEPORT [MASTERS] [REPLICAS] | down DIR | start-node DIR PORT" >&2
  exit 2
}

node_conf() {
  local dir=$1 port=$2
  local ndir="$dir/$port"
  mkdir -p "$ndir"
  {
    echo "port $port"
    echo "bind 127.0.0.1"
    echo "protected-mode no"
    echo "daemonize yes"
    echo "dir $ndir"
    echo "pidfile $ndir/redis.pid"
    echo "logfile $ndir/redis.log"
    echo "cluster-enabled yes"
    echo "cluster-config-file nodes.conf"
    echo "cluster-node-timeout ${REDIS_NODE_TIMEOUT:-2000}"
    # A replica may always take over, however long its link was down: a test that SIGSTOPs it
    # and then kills the master wants to see the failover, not a cluster stuck without a master.
    echo "cluster-replica-validity-factor 0"
    # Slots of a master that is down should not take every other slot's reads and writes down.
    echo "cluster-require-full-coverage no"
    echo "cluster-allow-reads-when-down no"
    echo "appendonly yes"
    echo "appendfsync always"
    echo "save \"\""
    echo "maxmemory-policy noeviction"
    if [ -n "${REDIS_MAXMEMORY:-}" ]; then echo "maxmemory $REDIS_MAXMEMORY"; fi
  } >"$ndir/redis.conf"
}

start_node() {
  local dir=$1 port=$2
  redis-server "$dir/$port/redis.conf"
  for _ in $(seq 1 100); do
    redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG && return 0
    sleep 0.05
  done
  echo "redis-cluster: node $port did not start (see $dir/$port/redis.log)" >&2
  return 1
}

cluster_ok() {
  local port=$1
  redis-cli -h 127.0.0.1 -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok'
}

replica_linked() {
  local port=$1 info
  info=$(redis-cli -h 127.0.0.1 -p "$port" info replication 2>/dev/null) || return 1
  if grep -q '^role:slave' <<<"$info"; then
    grep -q '^master_link_status:up' <<<"$info"
  else
    return 0
  fi
}

up() {
  [ $# -ge 2 ] || usage
  local dir=$1 base=$2 masters=${3:-3} replicas=${4:-1}
  local count=$((masters * (1 + replicas)))
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  local addrs=() ports=()
  for i in $(seq 0 $((count - 1))); do
    local port=$((base + i))
    ports+=("$port")
    addrs+=("127.0.0.1:$port")
    node_conf "$dir" "$port"
    start_node "$dir" "$port"
  done
  echo "${ports[*]}" >"$dir/ports"
  if [ "$count" -eq 1 ]; then
    redis-cli -h 127.0.0.1 -p "$base" cluster addslotsrange 0 16383 >/dev/null
  else
    redis-cli --cluster create "${addrs[@]}" --cluster-replicas "$replicas" --cluster-yes \
      >"$dir/create.log" 2>&1 || {
      cat "$dir/create.log" >&2
      return 1
    }
  fi
  for _ in $(seq 1 400); do
    local ready=1
    for port in "${ports[@]}"; do
      if ! cluster_ok "$port" || ! replica_linked "$port"; then
        ready=0
        break
      fi
    done
    if [ "$ready" -eq 1 ]; then
      echo "redis-cluster: up in $dir on ${ports[*]}"
      return 0
    fi
    sleep 0.05
  done
  echo "redis-cluster: cluster in $dir did not reach cluster_state:ok" >&2
  return 1
}

# A zombie (exited, not yet reaped by whoever adopted the daemon) counts as gone.
alive() {
  local pid=$1 state
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

down() {
  [ $# -ge 1 ] || usage
  local dir=$1 pids=()
  [ -d "$dir" ] || return 0
  for pidfile in "$dir"/*/redis.pid; do
    [ -f "$pidfile" ] || continue
    local pid
    pid=$(cat "$pidfile")
    # Only signal a pid that is still a redis-server (a stale pidfile may name a reused pid).
    if [ -n "$pid" ] && grep -q redis-server "/proc/$pid/cmdline" 2>/dev/null; then
      kill -CONT "$pid" 2>/dev/null || true
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 100); do
      alive "$pid" || break
      sleep 0.05
    done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 100); do
      alive "$pid" || break
      sleep 0.02
    done
  done
  rm -f "$dir"/*/redis.pid
}

cmd=${1:-}
shift || true
case "$cmd" in
up) up "$@" ;;
down) down "$@" ;;
start-node)
  [ $# -eq 2 ] || usage
  start_node "$1" "$2"
  ;;
*) usage ;;
esac
