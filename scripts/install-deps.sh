#!/usr/bin/env bash
# Install the Debian packages the test suite needs, and moto's S3 server from PyPI,
# skipping what is already installed. Safe to run repeatedly; runs `apt-get update` at most once and only
# when something is missing. Talks to the Debian archive and PyPI only.
#
#   scripts/install-deps.sh            # install what's missing
#   scripts/install-deps.sh --check    # exit 1 and list what's missing, install nothing
#
# Full apt output goes to $CAIRN_DEPS_LOG (default /tmp/cairn-install-deps.log);
# the terminal gets a short summary.
set -euo pipefail

# bazel-bootstrap      Bazel 4.2.3, the real REAPI client of the end-to-end test
# default-jdk-headless the JVM Bazel runs on
# fio                  storage benchmarks
# python3              generates the Bazel test workspace
# curl                 /healthz and /metrics probes, HTTP cache checks
# procps               ps/pgrep-by-PID checks in the test drivers
# protobuf-compiler    protoc for tonic/prost code generation
# ca-certificates      cargo fetching from crates.io over TLS
# python3-pip          installs moto (below) where python3 has no pip of its own
# systemd              systemd-analyze verify for the units in config/systemd
# openssl              makes the CAs and certificates of tests/tls.rs and
#                      scripts/e2e-bazel-secure.sh
# libnetty-tcnative-jni OpenSSL for Bazel's netty: Bazel 4.2.3's own TLS has no ALPN
#                      and fails every grpcs:// build without it
# apache2-utils        htpasswd, the bcrypt hash of scripts/e2e-bazel-secure.sh's
#                      basic-auth principal
# chromium             headless browser loading the status page in tests/status_page.rs
# prometheus           promtool, checking config/prometheus/alerts.yml in tests/dashboards.rs
# redis-server         the shared state of several schedulers, in tests/scheduler_redis.rs
# haproxy              the load balancer in front of several schedulers (end-to-end script)
PACKAGES=(
  bazel-bootstrap
  default-jdk-headless
  fio
  python3
  curl
  procps
  e2fsprogs
  mount
  protobuf-compiler
  ca-certificates
  python3-pip
  systemd
  openssl
  libnetty-tcnative-jni
  apache2-utils
  chromium
  prometheus
  redis-server
  haproxy
)

# From PyPI, not Debian:
# moto[server]         moto_server, a real S3-protocol server for the slow-tier tests,
#                      pinned: moto 5.2.x answers CompleteMultipartUpload with a root
#                      element the AWS SDK rejects (docs/s3.md)
MOTO_VERSION=5.1.22

LOG="${CAIRN_DEPS_LOG:-/tmp/cairn-install-deps.log}"
CHECK_ONLY=0
case "${1:-}" in
  --check) CHECK_ONLY=1 ;;
  "") ;;
  -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

is_installed() {
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = "installed" ]
}

missing=()
present=()
for p in "${PACKAGES[@]}"; do
  if is_installed "$p"; then present+=("$p"); else missing+=("$p"); fi
done

# moto_server for the S3 tests. A Debian python3 refuses pip installs into the system
# environment (PEP 668) unless told otherwise; a python3 of its own (pyenv, venv) does not.
moto_version() {
  python3 -c 'import moto; print(moto.__version__)' 2>/dev/null || true
}

ensure_moto() {
  local want="moto[server]==$MOTO_VERSION"
  if command -v moto_server >/dev/null 2>&1 && [ "$(moto_version)" = "$MOTO_VERSION" ]; then
    echo "install-deps: moto_server $MOTO_VERSION already installed"
    return 0
  fi
  if [ "$CHECK_ONLY" -eq 1 ]; then
    echo "install-deps: missing: $want (PyPI; found: $(moto_version))"
    exit 1
  fi
  echo "install-deps: installing $want from PyPI (log: $LOG)"
  echo "+ python3 -m pip install $want" >>"$LOG"
  if ! python3 -m pip install --quiet "$want" >>"$LOG" 2>&1 &&
     ! python3 -m pip install --quiet --break-system-packages "$want" >>"$LOG" 2>&1; then
    echo "install-deps: FAILED: pip install '$want'" >&2
    tail -n 40 "$LOG" >&2
    exit 1
  fi
  hash -r
  command -v moto_server >/dev/null 2>&1 || {
    echo "install-deps: moto_server is not on PATH after installing $want" >&2
    exit 1
  }
  [ "$(moto_version)" = "$MOTO_VERSION" ] || {
    echo "install-deps: python3 sees moto $(moto_version), not $MOTO_VERSION" >&2
    exit 1
  }
}

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} packages already installed"
  ensure_moto
  exit 0
fi

if [ "$CHECK_ONLY" -eq 1 ]; then
  echo "install-deps: missing: ${missing[*]}"
  exit 1
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=(sudo -n); else
    echo "install-deps: must run as root (or with sudo) to install: ${missing[*]}" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
: >"$LOG"
echo "install-deps: installing ${missing[*]} (log: $LOG)"
start=$(date +%s)

run() {
  echo "+ $*" >>"$LOG"
  if ! "${SUDO[@]}" "$@" >>"$LOG" 2>&1; then
    echo "install-deps: FAILED: $*" >&2
    echo "---- last 40 lines of $LOG ----" >&2
    tail -n 40 "$LOG" >&2
    exit 1
  fi
}

run apt-get update -q
run apt-get install -y -q --no-install-recommends "${missing[@]}"

# Confirm everything landed.
still=()
for p in "${missing[@]}"; do is_installed "$p" || still+=("$p"); done
if [ "${#still[@]}" -ne 0 ]; then
  echo "install-deps: still missing after install: ${still[*]} (see $LOG)" >&2
  exit 1
fi

ver=$(dpkg-query -W -f='${Version}' bazel-bootstrap 2>/dev/null || true)
echo "install-deps: installed ${#missing[@]} package(s) in $(( $(date +%s) - start ))s;" \
     "already present: ${#present[@]}; bazel-bootstrap ${ver:-?}"
ensure_moto
