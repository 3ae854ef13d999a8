#!/usr/bin/env bash
# Compares the storage engine's large-blob throughput with fio on the same directory.
#
# fio: O_DIRECT, ioengine=io_uring, 1 MiB blocks, a sequential write of SIZE_MIB then a
# sequential read of the same file, each bounded by RUNTIME seconds. The engine:
# `engine-seq` (bench/src/bin/engine-seq.rs) puts SIZE_MIB as distinct 16 MiB blobs,
# streamed in 1 MiB chunks (one O_DIRECT write unit each), then reads them back; once
# with SHA-256 digests, once with BLAKE3. It prints the bandwidths, one core's SHA-256
# rate, and the engine/fio ratios. Target: >= 0.80 for each.
#
#   scripts/fio-compare.sh [DIR]
#
# DIR defaults to a fresh directory under $CAIRN_BENCH_DIR (or /var/tmp); it must be
# on the device you want to measure, and not tmpfs. Knobs (environment):
#   SIZE_MIB=512   volume written and read by each side
#   RUNTIME=30     upper bound in seconds for each fio phase
#   IODEPTH=1      fio queue depth; CONCURRENCY (default: IODEPTH) uploads/reads in
#                  flight in the engine. One upload keeps one 1 MiB write in flight,
#                  so IODEPTH=1 is the like-for-like comparison.
# Output ends with `RESULT name=value unit` lines.
set -euo pipefail

SIZE_MIB=${SIZE_MIB:-512}
RUNTIME=${RUNTIME:-30}
IODEPTH=${IODEPTH:-1}
CONCURRENCY=${CONCURRENCY:-$IODEPTH}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

if ! command -v fio >/dev/null; then
  echo "fio not found; installing it" >&2
  apt-get update -qq && apt-get install -y -qq fio >/dev/null
fi
command -v jq >/dev/null || { apt-get update -qq && apt-get install -y -qq jq >/dev/null; }

if [[ $# -ge 1 ]]; then
  DIR=$1
  mkdir -p "$DIR"
  CLEAN=""
else
  BASE=${CAIRN_BENCH_DIR:-/var/tmp}
  mkdir -p "$BASE"
  DIR=$(mktemp -d "$BASE/cairn-fio-compare.XXXXXX")
  CLEAN=$DIR
fi
cleanup() {
  rm -rf "$DIR/fio" "$DIR/engine"
  [[ -n $CLEAN ]] && rm -rf "$CLEAN"
  return 0
}
trap cleanup EXIT
mkdir -p "$DIR/fio"

echo "== building engine-seq" >&2
(cd "$ROOT" && cargo build --release --quiet -p cairn-bench --bin engine-seq)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
ENGINE_SEQ=$TARGET/release/engine-seq

fio_bw() { # rw -> bytes per second
  fio --name="seq$1" --directory="$DIR/fio" --filename=fio.dat --rw="$1" --bs=1M \
    --size="${SIZE_MIB}M" --direct=1 --ioengine=io_uring --iodepth="$IODEPTH" \
    --runtime="$RUNTIME" --output-format=json |
    jq -r ".jobs[0].$1.bw_bytes"
}

echo "== fio: sequential write then read, ${SIZE_MIB} MiB, bs=1M, iodepth=$IODEPTH, $DIR" >&2
FIO_W=$(fio_bw write)
FIO_R=$(fio_bw read)
rm -rf "$DIR/fio"

# One run per digest function. The engine verifies every byte it stores, so a single
# upload can go no faster than one core hashes: engine-seq measures that rate too.
# SHA-256 (about 1.7 GB/s per core with SHA-NI) sits below a fast disk's write
# bandwidth; BLAKE3 (several GB/s) does not, so its run shows the engine's own limit.
engine_seq() { # digest -> engine-seq's RESULT lines
  echo "== engine ($1): ${SIZE_MIB} MiB as 16 MiB blobs, $CONCURRENCY in flight" >&2
  rm -rf "$DIR/engine"
  local out
  out=$("$ENGINE_SEQ" --dir "$DIR/engine" --total-mib "$SIZE_MIB" --blob-mib 16 \
    --concurrency "$CONCURRENCY" --digest "$1")
  echo "$out" | grep -v '^RESULT' >&2 || true
  echo "$out"
}
pick() { sed -n "s/^RESULT engine_seq.$1=\([0-9.]*\) MiB\/s$/\1/p"; }
SHA_OUT=$(engine_seq sha256)
B3_OUT=$(engine_seq blake3)
ENG_W=$(echo "$SHA_OUT" | pick write)
ENG_R=$(echo "$SHA_OUT" | pick read)
SHA_HASH=$(echo "$SHA_OUT" | pick hash)
B3_W=$(echo "$B3_OUT" | pick write)
if [[ -z $ENG_W || -z $ENG_R || -z $SHA_HASH || -z $B3_W ]]; then
  echo "engine-seq printed no results:" >&2
  echo "$SHA_OUT" "$B3_OUT" >&2
  exit 1
fi

awk -v fw="$FIO_W" -v fr="$FIO_R" -v ew="$ENG_W" -v er="$ENG_R" -v sh="$SHA_HASH" -v bw="$B3_W" '
function verdict(r) { return r >= 0.8 ? "met" : "MISSED" }
BEGIN {
  fw /= 1048576; fr /= 1048576
  ceiling = sh < fw ? sh : fw
  printf "RESULT fio.seq_write=%.1f MiB/s\n", fw
  printf "RESULT fio.seq_read=%.1f MiB/s\n", fr
  printf "RESULT sha256.one_core=%.1f MiB/s\n", sh
  printf "RESULT engine.seq_write_sha256=%.1f MiB/s\n", ew
  printf "RESULT engine.seq_write_blake3=%.1f MiB/s\n", bw
  printf "RESULT engine.seq_read=%.1f MiB/s\n", er
  printf "RESULT ratio.seq_write_blake3=%.3f engine/fio (target >= 0.80: %s)\n", bw / fw, verdict(bw / fw)
  printf "RESULT ratio.seq_write_sha256=%.3f engine/fio, %.3f of min(fio, one core of SHA-256)\n", ew / fw, ew / ceiling
  printf "RESULT ratio.seq_read=%.3f engine/fio (target >= 0.80: %s)\n", er / fr, verdict(er / fr)
}'
