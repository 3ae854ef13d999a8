#!/usr/bin/env bash
# Bazel end-to-end: a real Bazel 4.2.3 against real cairn processes on loopback.
#
#   scripts/e2e-bazel.sh [PATH_TO_CAIRN]
#
# Phases: cold then warm build over gRPC (every action a remote cache hit after
# Bazel's local state is wiped), a warm build with --remote_download_minimal, the
# same cold/warm over the HTTP cache protocol, then SIGKILL cairn, restart it on the
# same data directory, and the warm build is still all hits.
set -euo pipefail
cd "$(dirname "$0")/.."

CAIRN="${1:-target/debug/cairn}"
[ -x "$CAIRN" ] || { echo "e2e-bazel: $CAIRN not built (cargo build --bin cairn)" >&2; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/cairn-e2e.XXXXXX")"
export BAZEL_E2E_DIR="$WORK/bazel"
PID=""

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
cleanup() {
  stop_cairn
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
scripts/bazel-e2e.sh cold-warm "$HTTP"

log "SIGKILL cairn $PID and restart it on the same data directory"
kill -KILL "$PID"
wait "$PID" 2>/dev/null || true
PID=""
start_cairn
scripts/bazel-e2e.sh warm "$GRPC"

stop_cairn
log "all Bazel end-to-end phases passed"
echo "bazel-e2e: 5 passed, 0 failed"
