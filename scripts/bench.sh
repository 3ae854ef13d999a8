#!/usr/bin/env bash
# End-to-end benchmark: cairn against its ceilings, in one table.
#
#   scripts/bench.sh
#
# Builds `cairn` and `cairn-bench`, starts cairn on a fresh data directory and a sink
# (`cairn --sink`: the same network stack, blobs kept in memory), runs every
# load-generator scenario against both, and prints one table: each cairn figure with
# its ratio to the sink's. Also reported: loopback TCP bandwidth (the ceiling of any
# transfer), cairn's peak RSS (VmHWM) and its CPU seconds per GB moved, and, with
# FIO=1, scripts/fio-compare.sh (the disk's ceiling). Needs python3 (see
# scripts/install-deps.sh). A second table measures TLS: bs-write, bs-read and
# batch-small against a cairn serving TLS (a certificate made by `openssl` for the
# run) next to the plaintext cairn figures, with the cost of TLS as a percentage.
# Knobs (environment):
#   DURATION=3s       per scenario and node (bazel-like: half cold, half warm)
#   CONCURRENCY=8     operations in flight
#   CONNECTIONS=2     HTTP/2 connections
#   BLOB_SIZE=16MiB   bs-write / bs-read blobs
#   SHARDS=           cairn's --shards (default: one per CPU)
#   PROFILE=release   cargo profile to build and run
#   BUILD=1           0 uses the binaries already in the profile's directory (the
#                     test suite's smoke run, after `cargo test` built them)
#   FIO=0             1 runs scripts/fio-compare.sh too (SIZE_MIB=256 RUNTIME=10)
#   CAIRN_BENCH_DIR   where the data directory goes (default /var/tmp; not tmpfs)
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-3s}
CONCURRENCY=${CONCURRENCY:-8}
CONNECTIONS=${CONNECTIONS:-2}
BLOB_SIZE=${BLOB_SIZE:-16MiB}
PROFILE=${PROFILE:-release}
FIO=${FIO:-0}
# Free ports, asked of the kernel: fixed ones (this script used 50071-50073) sit in
# Linux's ephemeral range and a CI machine had one of them taken by another process.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
SHARD_ARGS=()
[[ -n "${SHARDS:-}" ]] && SHARD_ARGS=(--shards "$SHARDS")

command -v python3 >/dev/null || { echo "bench.sh: python3 is missing: run scripts/install-deps.sh" >&2; exit 1; }
CAIRN_PORT=${CAIRN_PORT:-$(free_port)}
SINK_PORT=${SINK_PORT:-$(free_port)}
DISCARD_PORT=${DISCARD_PORT:-$(free_port)}
TLS_PORT=${TLS_PORT:-$(free_port)}

if [[ "${BUILD:-1}" == 1 ]]; then
  echo "==> building ($PROFILE)" >&2
  cargo build --profile "$PROFILE" -p cairn --bin cairn -p cairn-bench --bin cairn-bench >&2
fi
TARGET=${CARGO_TARGET_DIR:-target}
case "$PROFILE" in dev) BIN=$TARGET/debug ;; *) BIN=$TARGET/$PROFILE ;; esac

WORK=$(mktemp -d "${CAIRN_BENCH_DIR:-/var/tmp}/cairn-bench.XXXXXX")
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# Polls until the node started as PID $2 accepts on port $1; stops at once if it died
# (a port someone else listens on must not pass for it).
wait_port() {
  for _ in $(seq 1 100); do
    kill -0 "$2" 2>/dev/null || break
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "bench.sh: nothing listens on port $1; the nodes' logs:" >&2
  tail -n 20 "$WORK"/*.log >&2
  exit 1
}

# --no-execution: the benchmark measures the cache; the scheduler and worker the
# single node would start are not built here.
"$BIN/cairn" --no-execution --listen "127.0.0.1:$CAIRN_PORT" --data-dir "$WORK/data" --max-size 8GiB \
  "${SHARD_ARGS[@]}" >"$WORK/cairn.log" 2>&1 &
CAIRN_PID=$!
PIDS+=("$CAIRN_PID")
"$BIN/cairn" --sink --no-execution --listen "127.0.0.1:$SINK_PORT" --data-dir "$WORK/sink" --max-size 2GiB \
  "${SHARD_ARGS[@]}" >"$WORK/sink.log" 2>&1 &
SINK_PID=$!
PIDS+=("$SINK_PID")
# bs-write's ceiling is a sink that keeps almost nothing. One that keeps every chunk
# up to 2 GiB spends the run faulting in fresh memory for them and came out at half
# of cairn's speed, which copies into reused buffers; a 64 MiB budget recycles.
"$BIN/cairn" --sink --no-execution --listen "127.0.0.1:$DISCARD_PORT" --data-dir "$WORK/discard" \
  --max-size 64MiB "${SHARD_ARGS[@]}" >"$WORK/discard.log" 2>&1 &
DISCARD_PID=$!
PIDS+=("$DISCARD_PID")
# The TLS node: a CA and a certificate for 127.0.0.1 it signs (P-256, what a fleet's
# CA issues most often), the same store settings as the plaintext cairn.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj /CN=bench-ca -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost \
  -keyout "$WORK/tls.key" -out "$WORK/tls.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$WORK/tls.ext"
openssl x509 -req -in "$WORK/tls.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" -CAcreateserial \
  -days 1 -extfile "$WORK/tls.ext" -out "$WORK/tls.pem" 2>/dev/null
"$BIN/cairn" --no-execution --listen "127.0.0.1:$TLS_PORT" --data-dir "$WORK/tls-data" --max-size 8GiB \
  --tls-cert "$WORK/tls.pem" --tls-key "$WORK/tls.key" "${SHARD_ARGS[@]}" >"$WORK/tls.log" 2>&1 &
TLS_PID=$!
PIDS+=("$TLS_PID")
wait_port "$CAIRN_PORT" "$CAIRN_PID"
wait_port "$SINK_PORT" "$SINK_PID"
wait_port "$DISCARD_PORT" "$DISCARD_PID"
wait_port "$TLS_PORT" "$TLS_PID"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

RESULTS=$WORK/results.jsonl
: >"$RESULTS"
for scenario in bs-write bs-write-blake3 bs-read batch-small batch-read find-missing ac bazel-like; do
  for target in sink cairn; do
    port=$SINK_PORT
    [[ $scenario == bs-write* ]] && port=$DISCARD_PORT
    [[ $target == cairn ]] && port=$CAIRN_PORT
    echo "==> $scenario against $target" >&2
    before=$(cpu_ticks "$CAIRN_PID")
    "$BIN/cairn-bench" --addr "grpc://127.0.0.1:$port" --scenario "$scenario" \
      --duration "$DURATION" --concurrency "$CONCURRENCY" --connections "$CONNECTIONS" \
      --blob-size "$BLOB_SIZE" --json >"$WORK/run.json"
    after=$(cpu_ticks "$CAIRN_PID")
    python3 - "$target" "$((after - before))" "$(getconf CLK_TCK)" "$WORK/run.json" >>"$RESULTS" <<'PY'
import json, sys
target, ticks, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for line in open(sys.argv[4]):
    row = json.loads(line)
    row["target"] = target
    row["cairn_cpu_seconds"] = ticks / hz
    print(json.dumps(row))
PY
  done
done
PEAK_RSS_KB=$(awk '/VmHWM/ {print $2}' "/proc/$CAIRN_PID/status")

TLS_RESULTS=$WORK/tls.jsonl
: >"$TLS_RESULTS"
for scenario in bs-write bs-read batch-small; do
  echo "==> $scenario against cairn over TLS" >&2
  "$BIN/cairn-bench" --addr "grpcs://127.0.0.1:$TLS_PORT" --tls-ca "$WORK/ca.pem" \
    --scenario "$scenario" --duration "$DURATION" --concurrency "$CONCURRENCY" \
    --connections "$CONNECTIONS" --blob-size "$BLOB_SIZE" --json >>"$TLS_RESULTS"
done

echo "==> loopback TCP bandwidth" >&2
LOOPBACK=$(python3 - <<'PY'
import socket, threading, time
TOTAL, CHUNK = 2 << 30, 1 << 20
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(1)
def sink():
    conn, _ = server.accept()
    buf = bytearray(CHUNK); view = memoryview(buf)
    while conn.recv_into(view):
        pass
thread = threading.Thread(target=sink); thread.start()
client = socket.create_connection(server.getsockname())
payload = b"\0" * CHUNK
start, sent = time.monotonic(), 0
while sent < TOTAL and time.monotonic() - start < 3:
    client.sendall(payload); sent += CHUNK
client.close(); thread.join()
print(f"{sent / (time.monotonic() - start) / 1e6:.0f}")
PY
)

FIO_LINES=""
if [[ "$FIO" == 1 ]]; then
  echo "==> fio comparison" >&2
  FIO_LINES=$(SIZE_MIB=${SIZE_MIB:-256} RUNTIME=${RUNTIME:-10} scripts/fio-compare.sh 2>&1 | grep '^RESULT' || true)
fi

python3 - "$RESULTS" "$PEAK_RSS_KB" "$LOOPBACK" "$FIO_LINES" "$TLS_RESULTS" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
tls_rows = [json.loads(line) for line in open(sys.argv[5])]
peak_rss_mb = int(sys.argv[2]) / 1024
loopback = float(sys.argv[3])
fio = sys.argv[4]
by = {(r["target"], r["scenario"]): r for r in rows}
scenarios = [r["scenario"] for r in rows if r["target"] == "cairn"]
def ratio(a, b):
    return f"{a / b:.2f}" if b else "-"
print("| scenario | cairn ops/s | sink ops/s | ratio | cairn MB/s | sink MB/s | ratio | cairn p50 / p99 / p999 µs | sink p50 / p99 / p999 µs | cairn CPU s/GB | errors+verify |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
cpu_total = moved_total = 0.0
failures = 0
for name in scenarios:
    c, s = by[("cairn", name)], by[("sink", name)]
    moved = c["mb_per_sec"] * c["seconds"] / 1000
    cpu = c["cairn_cpu_seconds"]
    if name != "bazel-like-warm":
        # bazel-like runs once for both phases: its CPU belongs to the pair.
        cpu_total += cpu
    moved_total += moved
    per_gb = f"{cpu / moved:.2f}" if moved > 0.01 and name != "bazel-like-warm" else "-"
    bad = c["errors"] + c["verify_failures"] + s["errors"] + s["verify_failures"]
    failures += bad
    print(f"| {name} | {c['ops_per_sec']:.0f} | {s['ops_per_sec']:.0f} | {ratio(c['ops_per_sec'], s['ops_per_sec'])} "
          f"| {c['mb_per_sec']:.0f} | {s['mb_per_sec']:.0f} | {ratio(c['mb_per_sec'], s['mb_per_sec'])} "
          f"| {c['p50_us']} / {c['p99_us']} / {c['p999_us']} | {s['p50_us']} / {s['p99_us']} / {s['p999_us']} "
          f"| {per_gb} | {bad} |")
print()
best = max(by[("cairn", n)]["mb_per_sec"] for n in scenarios)
print(f"- loopback TCP (one connection, python3): {loopback:.0f} MB/s; best cairn MB/s {best:.0f} = {best / loopback:.2f} of it")
print(f"- cairn peak RSS (VmHWM): {peak_rss_mb:.0f} MiB")
print(f"- cairn CPU per GB moved, all scenarios: {cpu_total / moved_total:.2f} s/GB" if moved_total else "- cairn CPU: nothing moved")
for line in fio.splitlines():
    print(f"- fio-compare: {line.removeprefix('RESULT ')}")
print()
print("| scenario | plaintext ops/s | TLS ops/s | plaintext MB/s | TLS MB/s | TLS cost | TLS p50 / p99 µs | errors+verify |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for t in tls_rows:
    c = by[("cairn", t["scenario"])]
    cost = f"{(1 - t['ops_per_sec'] / c['ops_per_sec']) * 100:.0f}%" if c["ops_per_sec"] else "-"
    bad = t["errors"] + t["verify_failures"]
    failures += bad
    print(f"| {t['scenario']} | {c['ops_per_sec']:.0f} | {t['ops_per_sec']:.0f} | {c['mb_per_sec']:.0f} "
          f"| {t['mb_per_sec']:.0f} | {cost} | {t['p50_us']} / {t['p99_us']} | {bad} |")
if failures:
    print(f"\nFAILED: {failures} errors or verification failures")
    sys.exit(1)
PY
