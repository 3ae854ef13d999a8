#!/usr/bin/env bash
# Runs every test cairn has, from a fresh clone, installing what it needs first.
#
#   scripts/test.sh
#
# Steps: system packages (Debian), formatting and lint gates, the Rust test suite
# (unit, engine crash/corruption tests, integration tests against the real binaries),
# the fuzz smoke run, and the end-to-end Bazel tests. Each step prints its name; the
# script stops at the first failure and exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not installed: install a Rust toolchain (https://rustup.rs) and rerun" >&2
  exit 1
fi

step "system packages"
scripts/install-deps.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cairn-scheduler and cairn-worker do not depend on the storage engine"
if cargo tree -p cairn-exec -e normal --prefix none | grep -E '^(cairn-storage|glommio) '; then
  echo "cairn-exec depends on the storage engine or glommio (above)" >&2
  exit 1
fi

step "cargo test"
cargo test --workspace

step "benchmark script smoke run (bench.sh end to end, every scenario briefly)"
BUILD=0 PROFILE=dev DURATION=500ms scripts/bench.sh

step "fuzz smoke (each target briefly, from its seeds)"
scripts/fuzz-smoke.sh

step "Bazel end-to-end (real Bazel 4.2.3 against real cairn processes)"
# `cargo test` already built cairn, cairn-scheduler and cairn-worker for the
# integration tests; a separate `cargo build --bins` resolves features without the
# dev-dependencies and rebuilt some 50 crates (4 minutes on 2 cores) for nothing.
scripts/e2e-bazel.sh target/debug/cairn

step "Bazel end-to-end over TLS, mutual TLS, bearer tokens and basic auth"
scripts/e2e-bazel-secure.sh target/debug/cairn

step "Bazel end-to-end against a fleet: schedulers sharing Redis behind HAProxy, one SIGKILLed mid-build, then Redis restarted mid-build"
scripts/e2e-bazel-fleet.sh target/debug/cairn
