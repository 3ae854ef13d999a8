#!/usr/bin/env bash
# Bazel end-to-end over TLS, mutual TLS, bearer tokens and basic auth: a real Bazel
# 4.2.3 against a real cairn node on loopback, with certificates made by the openssl
# CLI for this run.
#
#   scripts/e2e-bazel-secure.sh [PATH_TO_CAIRN]
#
# One node and one data directory, restarted with the flags of each mode:
#   1. TLS (--tls-cert/--tls-key): grpcs:// with --tls_certificate; cold then warm
#      (every action a remote cache hit after Bazel's local state is wiped); a
#      plaintext grpc:// client on the TLS port is refused.
#   2. Mutual TLS (+ --tls-client-ca, an auth file whose `cert` principal may read
#      and write): --tls_client_certificate/--tls_client_key; cold then warm; a client
#      without a certificate is refused.
#   3. Bearer token (TLS + the auth file): --remote_header=authorization=Bearer;
#      a wrong token is refused; a read-only principal's build is refused every
#      upload and stores nothing: on its salt, the writing token's cold build has
#      no hit at all, then its warm build is all hits.
#   4. HTTP cache over https://user:pass@ (TLS on the HTTP listener, a `basic`
#      principal): cold then warm. (A wrong password costs a whole local build in
#      Bazel, for a warning only; tests/auth.rs checks the 401.)
#   5. Remote execution over TLS with tokens: that node, a cairn-scheduler serving
#      TLS with the same auth file, one cairn-worker, both presenting the workers'
#      token over https:// to the node (and the worker to the scheduler); Bazel
#      with --remote_executor=grpcs://SCHEDULER --remote_cache=grpcs://NODE and a
#      token that may execute but not write action results (the worker's principal
#      writes them): exec-cold then exec-warm; a token without `execute` is refused.
#   6. Remote execution on the single node over TLS with tokens: the node started
#      without --no-execution runs its own scheduler and worker, which reach it on a
#      loopback port of their own; Bazel with --remote_executor=grpcs://NODE alone
#      and the `remote` token: exec-cold then exec-warm.
# Bazel's TLS needs netty-tcnative's OpenSSL binding (scripts/install-deps.sh
# installs libnetty-tcnative-jni): a copy named libnetty_tcnative.so goes into this
# run's temporary directory, handed to Bazel's JVM as java.library.path. Bazel
# 4.2.3's HTTP cache client ignores --tls_certificate and trusts only the JVM's trust
# store, so for https:// the CA goes into a PKCS#12 trust store (keytool) named by
# -Djavax.net.ssl.trustStore.
set -euo pipefail
cd "$(dirname "$0")/.."

CAIRN="${1:-target/debug/cairn}"
BIN_DIR="$(dirname "$CAIRN")"
for binary in "$CAIRN" "$BIN_DIR/cairn-scheduler" "$BIN_DIR/cairn-worker"; do
  [ -x "$binary" ] || { echo "e2e-bazel-secure: $binary not built (cargo build --bins)" >&2; exit 1; }
done
TCNATIVE=/usr/lib/x86_64-linux-gnu/jni/libnetty-tcnative.so
[ -f "$TCNATIVE" ] || { echo "e2e-bazel-secure: $TCNATIVE missing: run scripts/install-deps.sh" >&2; exit 1; }
for tool in openssl keytool htpasswd curl python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "e2e-bazel-secure: $tool missing: run scripts/install-deps.sh" >&2; exit 1; }
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/cairn-e2e-secure.XXXXXX")"
export BAZEL_E2E_DIR="$WORK/bazel"
CERTS="$WORK/certs"
PID=""
# The scheduler and the worker, stopped in this order: worker, scheduler.
EXEC_PIDS=()
PASSED=0
T0=$SECONDS

log() { printf '[e2e-bazel-secure %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

stop_cairn() {
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
    kill -TERM "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  PID=""
}
stop_exec() {
  local pid
  for pid in ${EXEC_PIDS[@]+"${EXEC_PIDS[@]}"}; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  EXEC_PIDS=()
}
cleanup() {
  local rc=$? f
  stop_exec
  stop_cairn
  # The servers' side of a failure, before their logs go with the directory.
  if [ "$rc" -ne 0 ]; then
    for f in cairn.log exec.log; do
      [ -s "$WORK/$f" ] || continue
      log "---- last 30 lines of $f ----"
      tail -n 30 "$WORK/$f" >&2
    done
  fi
  chmod -R u+w "$WORK" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
GRPC_PORT="$(free_port)"
HTTP_PORT="$(free_port)"

# ---------------------------------------------------------------------------
# Certificates: a CA, a server certificate for 127.0.0.1 and localhost, a client
# certificate (CN ci-client). EC P-256 keys; OpenSSL 3 writes them as PKCS#8
# ("BEGIN PRIVATE KEY"), the only form Bazel's --tls_client_key takes.
mkdir -p "$CERTS"
quiet_openssl() {
  local out
  out=$(cd "$CERTS" && openssl "$@" 2>&1) || { printf '%s\n' "$out" >&2; log "FAIL: openssl $*"; exit 1; }
}
quiet_openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=cairn-e2e-ca -addext basicConstraints=critical,CA:TRUE \
  -addext keyUsage=critical,keyCertSign,cRLSign -keyout ca.key -out ca.pem
make_cert() { # name cn extensions
  printf '%b' "$3" >"$CERTS/$1.ext"
  quiet_openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=$2" -keyout "$1.key" -out "$1.csr"
  quiet_openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
    -days 2 -extfile "$1.ext" -out "$1.pem"
}
make_cert server localhost 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n'
make_cert client ci-client 'extendedKeyUsage=clientAuth\n'
grep -q 'BEGIN PRIVATE KEY' "$CERTS/client.key" || { log "FAIL: client.key is not PKCS#8"; exit 1; }
keytool -importcert -noprompt -alias cairn-e2e-ca -file "$CERTS/ca.pem" -storetype PKCS12 \
  -keystore "$CERTS/truststore.p12" -storepass cairn-e2e >/dev/null 2>&1 ||
  { log "FAIL: keytool could not make the trust store"; exit 1; }

# ---------------------------------------------------------------------------
# Secrets of this run and the auth file: the node stores hashes only.
secret() { python3 -c 'import secrets; print(secrets.token_hex(16))'; }
sha256_hex() { printf %s "$1" | sha256sum | cut -d' ' -f1; }
CI_TOKEN="$(secret)"
REMOTE_TOKEN="$(secret)"
WORKER_TOKEN="$(secret)"
READER_TOKEN="$(secret)"
WRONG_TOKEN="$(secret)"
PASSWORD="$(secret)"
# Cost 4, bcrypt's lowest: the node checks it on every HTTP request of the build.
BCRYPT="$(htpasswd -nbB -C 4 alice "$PASSWORD" | cut -d: -f2-)"
AUTH="$WORK/auth.json5"
cat >"$AUTH" <<EOF
{
  principals: [
    { name: "ci", token_sha256: "$(sha256_hex "$CI_TOKEN")", permissions: ["read", "write", "write_ac"] },
    { name: "reader", token_sha256: "$(sha256_hex "$READER_TOKEN")", permissions: ["read"] },
    { name: "builder", cert: "ci-client", permissions: ["read", "write", "write_ac"] },
    { name: "remote", token_sha256: "$(sha256_hex "$REMOTE_TOKEN")", permissions: ["read", "write", "execute"] },
    { name: "workers", token_sha256: "$(sha256_hex "$WORKER_TOKEN")", permissions: ["read", "write", "write_ac"] },
    { name: "alice", basic: { user: "alice", hash: "$BCRYPT" }, permissions: ["read", "write", "write_ac"] },
  ],
}
EOF

# ---------------------------------------------------------------------------
# Bazel's side: netty-tcnative for its TLS, one bazelrc per client identity
# (a bazelrc line can quote the space in "Bearer TOKEN"; BAZEL_E2E_FLAGS cannot).
mkdir -p "$WORK/jni"
cp "$TCNATIVE" "$WORK/jni/libnetty_tcnative.so"
rc_file() { # name lines...
  local name=$1; shift
  printf '%s\n' "$@" >"$WORK/$name.bazelrc"
}
rc_file tls "build --tls_certificate=$CERTS/ca.pem"
rc_file mtls "build --tls_certificate=$CERTS/ca.pem" \
  "build --tls_client_certificate=$CERTS/client.pem --tls_client_key=$CERTS/client.key"
rc_file ci "build --tls_certificate=$CERTS/ca.pem" "build \"--remote_header=authorization=Bearer $CI_TOKEN\""
rc_file reader "build --tls_certificate=$CERTS/ca.pem" "build \"--remote_header=authorization=Bearer $READER_TOKEN\""
rc_file wrong "build --tls_certificate=$CERTS/ca.pem" "build \"--remote_header=authorization=Bearer $WRONG_TOKEN\""
rc_file remote "build --tls_certificate=$CERTS/ca.pem" "build \"--remote_header=authorization=Bearer $REMOTE_TOKEN\""
rc_file https "startup --host_jvm_args=-Djavax.net.ssl.trustStore=$CERTS/truststore.p12" \
  "startup --host_jvm_args=-Djavax.net.ssl.trustStorePassword=cairn-e2e"

# e2e RC ARGS...: scripts/bazel-e2e.sh ARGS with the bazelrc RC and tcnative.
e2e() {
  local rc=$1; shift
  BAZEL_E2E_STARTUP_FLAGS="--host_jvm_args=-Djava.library.path=$WORK/jni --bazelrc=$WORK/$rc.bazelrc" \
    scripts/bazel-e2e.sh "$@"
  PASSED=$((PASSED + 1))
}

# ---------------------------------------------------------------------------
# The node: the same data directory and ports each time, with the mode's flags; a
# cache only unless NODE_MODE is emptied (phase 6).
NODE_MODE=(--no-execution)
start_cairn() { # extra flags...
  stop_cairn
  "$CAIRN" --listen "127.0.0.1:$GRPC_PORT" --http-listen "127.0.0.1:$HTTP_PORT" \
    --data-dir "$WORK/data" --max-size 4GiB "${NODE_MODE[@]}" \
    --tls-cert "$CERTS/server.pem" --tls-key "$CERTS/server.key" "$@" >>"$WORK/cairn.log" 2>&1 &
  PID=$!
  # Ready when /healthz answers over TLS (it needs no credentials; the client
  # certificate is presented for the mutual-TLS mode); bounded by attempts.
  for _ in $(seq 1 600); do
    if curl -fsS --cacert "$CERTS/ca.pem" --cert "$CERTS/client.pem" --key "$CERTS/client.key" \
        "https://127.0.0.1:$HTTP_PORT/healthz" >/dev/null 2>&1; then
      log "cairn $PID ready on grpcs :$GRPC_PORT, https :$HTTP_PORT ($*)"
      return 0
    fi
    kill -0 "$PID" 2>/dev/null || { log "FAIL: cairn exited"; exit 1; }
    sleep 0.1
  done
  log "FAIL: cairn did not become ready"
  exit 1
}

GRPCS="grpcs://127.0.0.1:$GRPC_PORT"

log "1. TLS"
start_cairn
e2e tls cold-warm "$GRPCS"
e2e tls refused "grpc://127.0.0.1:$GRPC_PORT" 'Failed to query remote execution capabilities'

log "2. mutual TLS, the client certificate's principal"
start_cairn --tls-client-ca "$CERTS/ca.pem" --auth "$AUTH"
e2e mtls cold-warm "$GRPCS"
e2e tls refused "$GRPCS" 'Failed to query remote execution capabilities: .*certificate required'

log "3. bearer tokens over TLS"
start_cairn --auth "$AUTH"
e2e wrong refused "$GRPCS" 'UNAUTHENTICATED: unknown credentials'
RO_SALT="$(python3 -c 'import secrets; print(secrets.token_hex(6))')"
e2e reader --salt "$RO_SALT" refused "$GRPCS" 'PERMISSION_DENIED: reader lacks the .write. permission'
# Nothing of the read-only build was stored: on the same salt the writing token's
# cold build finds no hit at all (the cold phase asserts 0 hits), then its warm
# build is all hits.
e2e ci --salt "$RO_SALT" cold-warm "$GRPCS"

log "4. HTTP cache over https:// with basic auth"
e2e https cold-warm "https://alice:$PASSWORD@127.0.0.1:$HTTP_PORT"

log "5. remote execution over TLS with tokens: node, cairn-scheduler, cairn-worker"
# wait_file FILE PID NAME: until FILE exists; fails if PID exits first.
wait_file() {
  local file=$1 pid=$2 name=$3
  for _ in $(seq 1 600); do
    [ -s "$file" ] && return 0
    kill -0 "$pid" 2>/dev/null || { log "FAIL: $name exited"; exit 1; }
    sleep 0.1
  done
  log "FAIL: $name was not ready"
  exit 1
}
(umask 077 && printf %s "$WORKER_TOKEN" >"$WORK/worker.token")
NODE="https://127.0.0.1:$GRPC_PORT"
"$BIN_DIR/cairn-scheduler" --listen 127.0.0.1:0 --cache "$NODE" \
  --tls-cert "$CERTS/server.pem" --tls-key "$CERTS/server.key" --auth "$AUTH" \
  --tls-ca "$CERTS/ca.pem" --token-file "$WORK/worker.token" \
  --ready-file "$WORK/scheduler.addr" >>"$WORK/exec.log" 2>&1 &
EXEC_PIDS=("$!")
wait_file "$WORK/scheduler.addr" "${EXEC_PIDS[0]}" cairn-scheduler
SCHEDULER="$(cat "$WORK/scheduler.addr")"
"$BIN_DIR/cairn-worker" --scheduler "https://$SCHEDULER" --cache "$NODE" \
  --tls-ca "$CERTS/ca.pem" --token-file "$WORK/worker.token" --work-dir "$WORK/worker" \
  --ready-file "$WORK/worker.ready" >>"$WORK/exec.log" 2>&1 &
EXEC_PIDS=("$!" "${EXEC_PIDS[@]}")
wait_file "$WORK/worker.ready" "${EXEC_PIDS[0]}" cairn-worker
log "scheduler $SCHEDULER and a worker ready, over TLS with the workers' token"
BAZEL_E2E_FLAGS="--remote_executor=grpcs://$SCHEDULER" \
  e2e ci refused "$GRPCS" 'PERMISSION_DENIED: ci lacks the .execute. permission'
BAZEL_E2E_EXEC_CACHE="$GRPCS" e2e remote exec "grpcs://$SCHEDULER"
stop_exec

log "6. remote execution on the single node over TLS with tokens"
NODE_MODE=()
start_cairn --auth "$AUTH"
e2e remote exec "$GRPCS"

stop_cairn
log "all secure Bazel end-to-end phases passed in $((SECONDS - T0))s"
echo "bazel-e2e-secure: $PASSED passed, 0 failed"
