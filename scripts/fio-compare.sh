#!/usr/bin/env bash
# Compares the storage engine's large-blob throughput with fio on the same directory.
#
# fio: O_DIRECT, ioengine=io_uring, 1 MiB blocks, a sequential write of SIZE_MIB then a
# sequential read of the same file, each bounded by RUNTIME seconds. The engine:
# `engine-seq` (bench/src/bin/engine-seq.rs) puts SIZE_MIB as distinct 16 MiB blobs,
# streamed in 1 MiB chunks (one O_DIRECT write unit each), then reads them back. It
# prints both bandwidths and the engine/fio ratios. Target: >= 0.80 for each.
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

echo "== engine: ${SIZE_MIB} MiB as 16 MiB blobs, $CONCURRENCY in flight" >&2
ENGINE_OUT=$("$ENGINE_SEQ" --dir "$DIR/engine" --total-mib "$SIZE_MIB" --blob-mib 16 \
  --concurrency "$CONCURRENCY")
echo "$ENGINE_OUT" | grep -v '^RESULT' >&2 || true
ENG_W=$(echo "$ENGINE_OUT" | sed -n 's/^RESULT engine_seq.write=\([0-9.]*\) MiB\/s$/\1/p')
ENG_R=$(echo "$ENGINE_OUT" | sed -n 's/^RESULT engine_seq.read=\([0-9.]*\) MiB\/s$/\1/p')
if [[ -z $ENG_W || -z $ENG_R ]]; then
  echo "engine-seq printed no results:" >&2
  echo "$ENGINE_OUT" >&2
  exit 1
fi

awk -v fw="$FIO_W" -v fr="$FIO_R" -v ew="$ENG_W" -v er="$ENG_R" 'BEGIN {
  fw /= 1048576; fr /= 1048576
  printf "RESULT fio.seq_write=%.1f MiB/s\n", fw
  printf "RESULT fio.seq_read=%.1f MiB/s\n", fr
  printf "RESULT engine.seq_write=%.1f MiB/s\n", ew
  printf "RESULT engine.seq_read=%.1f MiB/s\n", er
  printf "RESULT ratio.seq_write=%.3f engine/fio (target >= 0.80: %s)\n", ew / fw, (ew / fw >= 0.8 ? "met" : "MISSED")
  printf "RESULT ratio.seq_read=%.3f engine/fio (target >= 0.80: %s)\n", er / fr, (er / fr >= 0.8 ? "met" : "MISSED")
}'
