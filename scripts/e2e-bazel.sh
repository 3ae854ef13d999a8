#!/usr/bin/env bash
# Bazel end-to-end: a real Bazel 4.2.3 against real cairn processes on loopback.
#
#   scripts/e2e-bazel.sh [PATH_TO_CAIRN]
#
# Phases: cold then warm build over gRPC (every action a remote cache hit after
# Bazel's local state is wiped), a warm build with --remote_download_minimal, the
# same cold/warm over the HTTP cache protocol, then SIGKILL cairn, restart it on the
# same data directory, and the warm build is still all hits. The Remote Asset API:
# `bazel-e2e.sh assets` (an http_archive and an http_file fetched through cairn, then
# built again with the HTTP server stopped and Bazel's caches wiped). Then remote execution:
# `bazel-e2e.sh exec` (every action runs remotely on the cold build, every action is
# a cache hit once Bazel's local state is wiped) against that same cairn, which was
# started with no execution-related flags and so runs its own scheduler and worker,
# and against the distributed example layout of config/distributed/: one cache
# node, one cairn-scheduler, two cairn-workers, all on loopback. The restarted single
# node exports traces to an OTLP receiver (`examples/otlp-receiver.rs`, which
# `cargo test` builds): the remote execution build must produce traces whose spans
# connect node → scheduler → worker and carry Bazel's RequestMetadata.
#
# cairn-scheduler and cairn-worker are taken from the directory of PATH_TO_CAIRN
# (`cargo test` and `cargo build --bins` both put all three there).
set -euo pipefail
cd "$(dirname "$0")/.."

CAIRN="${1:-target/debug/cairn}"
BIN_DIR="$(dirname "$CAIRN")"
for binary in "$CAIRN" "$BIN_DIR/cairn-scheduler" "$BIN_DIR/cairn-worker"; do
  [ -x "$binary" ] || { echo "e2e-bazel: $binary not built (cargo build --bins)" >&2; exit 1; }
done
RECEIVER="$BIN_DIR/examples/otlp-receiver"
[ -x "$RECEIVER" ] || { echo "e2e-bazel: $RECEIVER not built (cargo build --example otlp-receiver)" >&2; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/cairn-e2e.XXXXXX")"
export BAZEL_E2E_DIR="$WORK/bazel"
PID=""
RECEIVER_PID=""
# The distributed layout's processes, stopped in this order: workers, scheduler, node.
DIST_PIDS=()

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
GRPC_PORT="$(free_port)"
HTTP_PORT="$(free_port)"

log() { printf '[e2e-bazel %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

stop_cairn() {
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
    kill -TERM "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  PID=""
}
stop_distributed() {
  local pid
  for pid in ${DIST_PIDS[@]+"${DIST_PIDS[@]}"}; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  DIST_PIDS=()
}
cleanup() {
  stop_distributed
  stop_cairn
  if [ -n "$RECEIVER_PID" ]; then kill "$RECEIVER_PID" 2>/dev/null || true; wait "$RECEIVER_PID" 2>/dev/null || true; fi
  chmod -R u+w "$WORK" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

start_cairn() {
  "$CAIRN" --listen "127.0.0.1:$GRPC_PORT" --http-listen "127.0.0.1:$HTTP_PORT" \
    --data-dir "$WORK/data" --max-size 4GiB >>"$WORK/cairn.log" 2>&1 &
  PID=$!
  # Ready when /healthz answers; bounded by the number of attempts, not by sleeping.
  for _ in $(seq 1 600); do
    if curl -fsS "http://127.0.0.1:$HTTP_PORT/healthz" >/dev/null 2>&1; then
      log "cairn $PID ready on grpc :$GRPC_PORT, http :$HTTP_PORT"
      return 0
    fi
    kill -0 "$PID" 2>/dev/null || { tail -n 40 "$WORK/cairn.log" >&2; log "FAIL: cairn exited"; exit 1; }
    sleep 0.1
  done
  tail -n 40 "$WORK/cairn.log" >&2
  log "FAIL: cairn did not become ready"
  exit 1
}

GRPC="grpc://127.0.0.1:$GRPC_PORT"
HTTP="http://127.0.0.1:$HTTP_PORT"

start_cairn
scripts/bazel-e2e.sh cold-warm "$GRPC"
scripts/bazel-e2e.sh warm-minimal "$GRPC"
scripts/bazel-e2e.sh assets "$GRPC"
scripts/bazel-e2e.sh cold-warm "$HTTP"

log "SIGKILL cairn $PID and restart it on the same data directory, exporting traces"
kill -KILL "$PID"
wait "$PID" 2>/dev/null || true
PID=""
"$RECEIVER" "$WORK/otlp.addr" "$WORK/spans.jsonl" >>"$WORK/otlp.log" 2>&1 &
RECEIVER_PID=$!
for _ in $(seq 1 600); do
  [ -s "$WORK/otlp.addr" ] && break
  kill -0 "$RECEIVER_PID" 2>/dev/null || { cat "$WORK/otlp.log" >&2; log "FAIL: otlp-receiver exited"; exit 1; }
  sleep 0.1
done
OTEL_EXPORTER_OTLP_ENDPOINT="http://$(cat "$WORK/otlp.addr")" OTEL_BSP_SCHEDULE_DELAY=200 start_cairn
scripts/bazel-e2e.sh warm "$GRPC"

log "remote execution on the single node (no execution-related flags)"
scripts/bazel-e2e.sh exec "$GRPC"
# A clean stop flushes the spans the three processes still buffer.
stop_cairn
python3 - "$WORK/spans.jsonl" <<'PY'
import json, sys
spans = [json.loads(line) for line in open(sys.argv[1])]
by_id = {(s["trace_id"], s["span_id"]): s for s in spans}
connected = 0
for worker in (s for s in spans if s["service"] == "cairn-worker" and s["name"] == "Execute"):
    scheduler = by_id.get((worker["trace_id"], worker["parent_span_id"]))
    if not scheduler or scheduler["service"] != "cairn-scheduler":
        continue
    node = by_id.get((scheduler["trace_id"], scheduler["parent_span_id"]))
    if not node or node["service"] != "cairn" or not node["name"].endswith("Execution/Execute"):
        continue
    attributes = node["attributes"]
    if attributes.get("bazel.tool_invocation_id") and attributes.get("bazel.action_mnemonic"):
        connected += 1
print(f"[e2e-bazel] {connected} remote actions traced node -> scheduler -> worker "
      f"({len(spans)} spans)", file=sys.stderr)
sys.exit(0 if connected > 0 else 1)
PY
kill "$RECEIVER_PID" 2>/dev/null || true
wait "$RECEIVER_PID" 2>/dev/null || true
RECEIVER_PID=""

# wait_file FILE PID NAME: until FILE exists; fails if PID exits first.
wait_file() {
  local file=$1 pid=$2 name=$3
  for _ in $(seq 1 600); do
    [ -s "$file" ] && return 0
    kill -0 "$pid" 2>/dev/null || { tail -n 40 "$WORK/dist.log" >&2; log "FAIL: $name exited"; exit 1; }
    sleep 0.1
  done
  tail -n 40 "$WORK/dist.log" >&2
  log "FAIL: $name was not ready"
  exit 1
}

# The distributed example: the config files as shipped, with loopback addresses,
# ports and directories of this run given as flags.
CACHE_PORT="$(free_port)"
CACHE="http://127.0.0.1:$CACHE_PORT"
"$CAIRN" --config config/distributed/cache.json5 --listen "127.0.0.1:$CACHE_PORT" \
  --data-dir "$WORK/dist-data" --max-size 4GiB >>"$WORK/dist.log" 2>&1 &
DIST_PIDS=("$!")
for _ in $(seq 1 600); do
  (exec 3<>"/dev/tcp/127.0.0.1/$CACHE_PORT") 2>/dev/null && break
  kill -0 "${DIST_PIDS[0]}" 2>/dev/null || { tail -n 40 "$WORK/dist.log" >&2; log "FAIL: cache node exited"; exit 1; }
  sleep 0.1
done
"$BIN_DIR/cairn-scheduler" --config config/distributed/scheduler.json5 --listen 127.0.0.1:0 \
  --cache "$CACHE" --ready-file "$WORK/scheduler.addr" >>"$WORK/dist.log" 2>&1 &
DIST_PIDS=("$!" "${DIST_PIDS[@]}")
wait_file "$WORK/scheduler.addr" "${DIST_PIDS[0]}" cairn-scheduler
SCHEDULER="$(cat "$WORK/scheduler.addr")"
for worker in worker-a worker-b; do
  "$BIN_DIR/cairn-worker" --config "config/distributed/$worker.json5" \
    --scheduler "http://$SCHEDULER" --cache "$CACHE" --work-dir "$WORK/$worker" \
    --ready-file "$WORK/$worker.ready" >>"$WORK/dist.log" 2>&1 &
  DIST_PIDS=("$!" "${DIST_PIDS[@]}")
  wait_file "$WORK/$worker.ready" "${DIST_PIDS[0]}" "cairn-worker $worker"
done
log "distributed layout ready: cache :$CACHE_PORT, scheduler $SCHEDULER, workers a and b"
BAZEL_E2E_EXEC_CACHE="grpc://127.0.0.1:$CACHE_PORT" scripts/bazel-e2e.sh exec "grpc://$SCHEDULER"
stop_distributed

log "all Bazel end-to-end phases passed"
echo "bazel-e2e: 8 passed, 0 failed"
