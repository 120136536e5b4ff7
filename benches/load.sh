#!/usr/bin/env bash
# Serves each variant on core 0 (one worker thread) and drives it with wrk on core 1, over loopback
# HTTP, in interleaved rounds (every variant once per round, so drift hits all alike); prints each
# variant's median requests/s with the range over the rounds, its p99, and its ratio to the bare
# router (and, for the Redis variants, to the in-memory limiter), all from one run.
#
#   bash benches/load.sh                        # 3 rounds of 5 s per variant, 64 connections
#   ROUNDS=5 DURATION=10s CONNS=128 bash benches/load.sh
#   VARIANTS="bare keygate_local" bash benches/load.sh
#
# With redis-server on PATH the Redis limiter variants run too, against a redis-server of the
# script's own (no persistence), pinned to core 1 beside wrk: the server's core stays the server's.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
DURATION=${DURATION:-5s}
CONNS=${CONNS:-64}
ROUNDS=${ROUNDS:-3}
PORT=${PORT:-3900}
DEFAULT="bare static_bearer tower_governor hand_service hand_hashmap keygate_local keygate_local_limit keygate_local_limit_headers keygate_oneloop_warm keygate_oneloop_warm_limit_headers"
features=oneloop
redis_pid=""
if command -v redis-server >/dev/null; then
  features=oneloop,redis
  DEFAULT="$DEFAULT keygate_redis_limit keygate_redis_limit_local_first"
  redis_port=$((PORT + 500))
  taskset -c 1 redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$(mktemp -d)" >/tmp/keygate-bench-redis.log 2>&1 &
  redis_pid=$!
  export REDIS_URL="redis://127.0.0.1:$redis_port"
  for _ in $(seq 1 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
trap '[ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null || true' EXIT
VARIANTS=${VARIANTS:-$DEFAULT}

cargo build --quiet --release --features "$features" --example bench_server
server=target/release/examples/bench_server
results=$(mktemp)

for round in $(seq 1 "$ROUNDS"); do
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
    echo "$v $round $rps $p99" >>"$results"
    PORT=$((PORT + 1))
  done
  echo "round $round of $ROUNDS done" >&2
done

# Per variant: median, min and max requests/s, the median round's p99; ratios of medians.
python3 - "$results" $VARIANTS <<'EOF'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
by = {}
for v, _, rps, p99 in rows:
    by.setdefault(v, []).append((float(rps), p99))
def med(v):
    return statistics.median(r for r, _ in by[v])
print(f"{'variant':<36} {'req/s (median)':>15} {'range':>17} {'p99':>9} {'vs bare':>8} {'vs local limit':>15}")
for v in sys.argv[2:]:
    runs = sorted(by[v])
    m = med(v)
    p99 = runs[len(runs) // 2][1]
    bare = f"{m / med('bare'):.2f}x" if 'bare' in by else ''
    limit = f"{m / med('keygate_local_limit'):.2f}x" if v.startswith('keygate_redis') and 'keygate_local_limit' in by else ''
    print(f"{v:<36} {m:>15,.0f} {runs[0][0]:>8,.0f}-{runs[-1][0]:<8,.0f} {p99:>9} {bare:>8} {limit:>15}")
EOF
rm -f "$results"
