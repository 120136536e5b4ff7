#!/usr/bin/env bash
# Serves each variant on core 0 (one worker thread) and drives it with wrk on core 1, over loopback
# HTTP; prints requests/s, p99 and the ratio to the bare router, in one run.
#
#   bash benches/load.sh                 # 10 s per variant, 64 connections
#   DURATION=30s CONNS=128 bash benches/load.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
PORT=${PORT:-3900}
VARIANTS=${VARIANTS:-"bare static_bearer tower_governor hand_service hand_hashmap keygate_local keygate_local_limit_headers keygate_oneloop_warm keygate_oneloop_warm_limit_headers"}

cargo build --quiet --release --features oneloop --example bench_server
server=target/release/examples/bench_server

printf '%-36s %12s %10s %8s\n' variant "req/s" "p99" "vs bare"
bare=""
for v in $VARIANTS; do
  VARIANT=$v PORT=$PORT taskset -c 0 "$server" >/tmp/keygate-bench-server.log 2>&1 &
  pid=$!
  for _ in $(seq 1 100); do grep -q ready /tmp/keygate-bench-server.log 2>/dev/null && break; sleep 0.1; done
  keys=1000; [ "$v" = static_bearer ] && keys=1
  out=$(KEYS=$keys taskset -c 1 wrk -t1 -c"$CONNS" -d"$DURATION" --latency -s benches/keys.lua "http://127.0.0.1:$PORT/v1/items")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  if echo "$out" | grep -q "Non-2xx"; then echo "$v: some responses were not 2xx" >&2; echo "$out" >&2; exit 1; fi
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
  [ -z "$bare" ] && bare=$rps
  printf '%-36s %12.0f %10s %7.1f%%\n' "$v" "$rps" "$p99" "$(echo "$rps $bare" | awk '{print 100 * $1 / $2}')"
  PORT=$((PORT + 1))
done
