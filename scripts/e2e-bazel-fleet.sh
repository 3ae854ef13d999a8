#!/usr/bin/env bash
# Bazel end-to-end against an execution fleet that survives losing a scheduler:
# the layout of config/fleet/, all on loopback.
#
#   scripts/e2e-bazel-fleet.sh [PATH_TO_CAIRN]
#
#   redis-server (config/fleet/redis.conf, AOF on)
#   cairn cache node (--no-execution)
#   cairn-scheduler a and b (config/fleet/scheduler.json5), sharing Redis
#   haproxy in TCP mode in front of both (config/fleet/haproxy.cfg)
#   cairn-worker 1 given both schedulers, cairn-worker 2 given the balancer
#
# Phases, each a real Bazel 4.2.3 with --remote_executor=grpc://<haproxy>:
#   1. a cold build during which scheduler a is killed with SIGKILL once some
#      actions have run: the build succeeds, every action ran remotely (or, retried
#      by Bazel after its stream broke, was answered from the cache), and no
#      action ran more often than 1 + max_job_retries times (from the workers' logs);
#      then a warm build is all cache hits;
#   2. a cold build during which Redis is restarted (clean stop, AOF kept): the
#      build succeeds, no action ran locally, none ran more often than allowed; then
#      a warm build is all cache hits.
# The files of config/fleet/ are used as shipped, with this run's ports and
# directories substituted.
set -euo pipefail
cd "$(dirname "$0")/.."

CAIRN="${1:-target/debug/cairn}"
BIN_DIR="$(dirname "$CAIRN")"
for binary in "$CAIRN" "$BIN_DIR/cairn-scheduler" "$BIN_DIR/cairn-worker"; do
  [ -x "$binary" ] || { echo "e2e-bazel-fleet: $binary not built (cargo build)" >&2; exit 1; }
done
for tool in redis-server haproxy; do
  command -v "$tool" >/dev/null || { echo "e2e-bazel-fleet: $tool is missing (scripts/install-deps.sh)" >&2; exit 1; }
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/cairn-fleet.XXXXXX")"
export BAZEL_E2E_DIR="$WORK/bazel"
declare -A PIDS=()
BAZEL_PID=""

log() { printf '[e2e-bazel-fleet %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

stop() {
  local name=$1 pid=${PIDS[$1]:-}
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  unset "PIDS[$name]"
}
cleanup() {
  if [ -n "$BAZEL_PID" ]; then kill "$BAZEL_PID" 2>/dev/null || true; wait "$BAZEL_PID" 2>/dev/null || true; fi
  for name in worker-1 worker-2 haproxy scheduler-a scheduler-b cache redis; do stop "$name"; done
  chmod -R u+w "$WORK" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

fail() {
  log "FAIL: $*"
  for file in "$WORK"/*.log; do
    [ -f "$file" ] || continue
    echo "--- $(basename "$file") (last 30 lines)" >&2
    tail -n 30 "$file" >&2
  done
  exit 1
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_until NAME CHECK...: until the command CHECK succeeds; fails if process NAME
# exits first. Bounded by attempts, not by a sleep standing in for a condition.
wait_until() {
  local name=$1; shift
  for _ in $(seq 1 600); do
    "$@" >/dev/null 2>&1 && return 0
    kill -0 "${PIDS[$name]}" 2>/dev/null || fail "$name exited"
    sleep 0.1
  done
  fail "$name was not ready"
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

REDIS_PORT="$(free_port)"
CACHE_PORT="$(free_port)"
CACHE_HTTP="$(free_port)"
A_PORT="$(free_port)"
B_PORT="$(free_port)"
A_HTTP="$(free_port)"
B_HTTP="$(free_port)"
LB_PORT="$(free_port)"
REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
CACHE="http://127.0.0.1:$CACHE_PORT"

start_redis() {
  mkdir -p "$WORK/redis"
  redis-server config/fleet/redis.conf --port "$REDIS_PORT" --dir "$WORK/redis" \
    >>"$WORK/redis.log" 2>&1 &
  PIDS[redis]=$!
  wait_until redis redis-cli -p "$REDIS_PORT" ping
}

start_scheduler() {
  local name=$1 port=$2 http=$3
  RUST_LOG=info "$BIN_DIR/cairn-scheduler" --config config/fleet/scheduler.json5 \
    --listen "127.0.0.1:$port" --http-listen "127.0.0.1:$http" --cache "$CACHE" \
    --redis "$REDIS_URL" >>"$WORK/scheduler-$name.log" 2>&1 &
  PIDS[scheduler-$name]=$!
  wait_until "scheduler-$name" curl -fsS "http://127.0.0.1:$http/healthz"
}

start_worker() {
  local name=$1; shift
  RUST_LOG=info,cairn_exec::worker::runner=debug "$BIN_DIR/cairn-worker" \
    --config config/fleet/worker.json5 "$@" --cache "$CACHE" --id "$name" \
    --work-dir "$WORK/$name" --ready-file "$WORK/$name.ready" >>"$WORK/$name.log" 2>&1 &
  PIDS[$name]=$!
  wait_until "$name" test -s "$WORK/$name.ready"
}

# completed_actions: actions finished so far, as the surviving schedulers count them.
completed_actions() {
  local total=0 http value
  for http in "$A_HTTP" "$B_HTTP"; do
    value=$(curl -fsS "http://127.0.0.1:$http/metrics" 2>/dev/null \
      | awk '/^cairn_scheduler_completed_total/ { n += $2 } END { print n + 0 }') || value=0
    total=$((total + ${value:-0}))
  done
  echo "$total"
}

# cold_build_with EVENT: a cold remote-execution build through the balancer; once
# 20 more actions have completed, EVENT (a function) runs while the build goes on.
cold_build_with() {
  local event=$1 target
  target=$(( $(completed_actions) + 20 ))
  # An Execute that Bazel retries after its stream broke may find its result stored
  # already, which Bazel counts as a remote cache hit: still run once, never locally.
  BAZEL_E2E_EXEC_CACHE="grpc://127.0.0.1:$CACHE_PORT" BAZEL_E2E_EXEC_COLD_KIND=executor \
    scripts/bazel-e2e.sh exec-cold "grpc://127.0.0.1:$LB_PORT" &
  BAZEL_PID=$!
  for _ in $(seq 1 3000); do
    [ "$(completed_actions)" -ge "$target" ] && break
    kill -0 "$BAZEL_PID" 2>/dev/null || fail "the build ended before 20 actions completed"
    sleep 0.1
  done
  [ "$(completed_actions)" -ge "$target" ] || fail "fewer than 20 actions completed"
  "$event"
  local rc=0
  wait "$BAZEL_PID" || rc=$?
  BAZEL_PID=""
  [ "$rc" -eq 0 ] || fail "the cold build failed (exit $rc) after: $event"
  BAZEL_E2E_EXEC_CACHE="grpc://127.0.0.1:$CACHE_PORT" \
    scripts/bazel-e2e.sh exec-warm "grpc://127.0.0.1:$LB_PORT" || fail "the warm build after '$event' was not all hits"
}

kill_scheduler_a() {
  log "SIGKILL scheduler a (pid ${PIDS[scheduler-a]}) after $(completed_actions) completed actions"
  kill -KILL "${PIDS[scheduler-a]}"
  wait "${PIDS[scheduler-a]}" 2>/dev/null || true
  unset "PIDS[scheduler-a]"
}

restart_redis() {
  log "restarting Redis (clean stop, AOF kept) after $(completed_actions) completed actions"
  stop redis
  start_redis
}

# Every action the workers started, by action digest, ran at most 1 + max_job_retries
# times; prints how many ran more than once.
check_executions() {
  local retries
  retries=$(awk -F: '/^ *max_job_retries/ { gsub(/[ ,]/, "", $2); print $2 }' config/fleet/scheduler.json5)
  python3 - "$retries" "$WORK"/worker-*.log <<'PY'
import collections, re, sys
limit = 1 + int(sys.argv[1])
runs = collections.Counter()
for path in sys.argv[2:]:
    for line in open(path, errors="replace"):
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        if "task started" in line:
            match = re.search(r"action=([0-9a-f]{64})", line)
            if match:
                runs[match.group(1)] += 1
if not runs:
    sys.exit("no task was started on the workers")
over = {action: n for action, n in runs.items() if n > limit}
again = sum(1 for n in runs.values() if n > 1)
print(f"[e2e-bazel-fleet] {len(runs)} distinct actions executed, {again} more than once "
      f"(at most {limit} allowed)", file=sys.stderr)
sys.exit(f"actions executed more than {limit} times: {over}" if over else 0)
PY
}

start_redis
"$CAIRN" --no-execution --listen "127.0.0.1:$CACHE_PORT" --http-listen "127.0.0.1:$CACHE_HTTP" \
  --data-dir "$WORK/cache" --max-size 4GiB >>"$WORK/cache.log" 2>&1 &
PIDS[cache]=$!
wait_until cache curl -fsS "http://127.0.0.1:$CACHE_HTTP/healthz"
start_scheduler a "$A_PORT" "$A_HTTP"
start_scheduler b "$B_PORT" "$B_HTTP"
sed -e "s/127.0.0.1:50060/127.0.0.1:$LB_PORT/" -e "s/127.0.0.1:50061/127.0.0.1:$A_PORT/" \
  -e "s/127.0.0.1:50062/127.0.0.1:$B_PORT/" config/fleet/haproxy.cfg >"$WORK/haproxy.cfg"
haproxy -c -q -f "$WORK/haproxy.cfg" || fail "haproxy refuses config/fleet/haproxy.cfg"
haproxy -db -f "$WORK/haproxy.cfg" >>"$WORK/haproxy.log" 2>&1 &
PIDS[haproxy]=$!
wait_until haproxy port_open "$LB_PORT"
start_worker worker-1 --scheduler "http://127.0.0.1:$A_PORT" --scheduler "http://127.0.0.1:$B_PORT"
start_worker worker-2 --scheduler "http://127.0.0.1:$LB_PORT"
log "fleet ready: redis :$REDIS_PORT, cache :$CACHE_PORT, schedulers :$A_PORT :$B_PORT behind haproxy :$LB_PORT"

cold_build_with kill_scheduler_a
check_executions || fail "an action ran more often than max_job_retries allows"
log "phase 1 passed: a scheduler killed mid-build, the build succeeded, the warm build was all hits"
start_scheduler a "$A_PORT" "$A_HTTP"

cold_build_with restart_redis
check_executions || fail "an action ran more often than max_job_retries allows"
log "phase 2 passed: Redis restarted mid-build, the build succeeded, the warm build was all hits"

log "all fleet phases passed"
echo "bazel-e2e-fleet: 2 passed, 0 failed"
