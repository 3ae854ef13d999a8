#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ briefly: the CI smoke test of the fuzzers.
#
#   scripts/fuzz-smoke.sh            # each target for FUZZ_SECONDS (default 20) seconds
#   FUZZ_REPLAY=1 scripts/fuzz-smoke.sh   # only replay fuzz/seeds and fuzz/corpus, no search
#
# Each target starts from its committed seeds (fuzz/seeds/TARGET) plus whatever
# fuzz/corpus/TARGET already holds (not committed), and runs with a 512 MiB RSS limit
# so that unbounded allocation fails too. A failing input is left in
# fuzz/artifacts/TARGET/ and the script exits non-zero. Longer runs: fuzz/README.md.
#
# Knobs: FUZZ_SECONDS, FUZZ_REPLAY, FUZZ_TARGETS (space-separated subset),
# FUZZ_SANITIZER (default none: works on the stable toolchain; "address" needs
# FUZZ_TOOLCHAIN=nightly).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SECONDS_EACH=${FUZZ_SECONDS:-20}
SANITIZER=${FUZZ_SANITIZER:-none}
TOOLCHAIN=${FUZZ_TOOLCHAIN:+"+$FUZZ_TOOLCHAIN"}

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz not found; installing it" >&2
  cargo install cargo-fuzz --locked
fi

cd "$ROOT/fuzz"
TARGETS=${FUZZ_TARGETS:-$(cargo $TOOLCHAIN fuzz list)}
if [[ -n ${FUZZ_REPLAY:-} ]]; then
  LIMIT=(-runs=0)
else
  LIMIT=(-max_total_time="$SECONDS_EACH")
fi

failed=()
for t in $TARGETS; do
  mkdir -p "corpus/$t" "seeds/$t"
  echo "== fuzz $t (${LIMIT[*]})" >&2
  if cargo $TOOLCHAIN fuzz run -O -s "$SANITIZER" "$t" "corpus/$t" "seeds/$t" -- \
    "${LIMIT[@]}" -rss_limit_mb=512 -print_final_stats=1 >"corpus/$t.log" 2>&1; then
    grep -E '^(#[0-9]+[[:space:]]+DONE|Done [0-9]+ runs|stat::number_of_executed_units)' \
      "corpus/$t.log" | tail -2 >&2 || true
  else
    tail -40 "corpus/$t.log" >&2
    echo "FAILED: $t (input saved under fuzz/artifacts/$t/, log fuzz/corpus/$t.log)" >&2
    failed+=("$t")
  fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "fuzz targets failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz smoke: all targets passed" >&2
