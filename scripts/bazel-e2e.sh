#!/usr/bin/env bash
# End-to-end test of a REAPI cache / executor with a real Bazel (Debian's
# bazel-bootstrap, Bazel 4.2.3), fully offline. See scripts/bazel-e2e/README.md.
#
# usage: scripts/bazel-e2e.sh [--salt S] PHASE [ARGS]
#
#   selftest                  unit-test the summary-line parser (no Bazel needed)
#   local                     offline build with no remote at all; >= 100 actions
#   cold URL                  new salt; build with --remote_cache=URL: every action
#                             runs locally and is uploaded, none is a hit
#   warm URL                  fresh output base, same salt: every action is a remote
#                             cache hit; downloaded outputs match the cold build's
#   warm-minimal URL          the same with --remote_download_minimal
#   cold-warm URL             cold URL, then warm URL
#   exec-cold URL             new salt; --remote_executor=URL: every action runs remotely
#   exec-warm URL             fresh output base: every action is a remote cache hit
#   exec URL                  exec-cold URL, then exec-warm URL
#   refused URL REGEX         new salt; --remote_cache=URL: passes when Bazel's output
#                             has a line matching the extended regex REGEX, whatever
#                             Bazel's exit code (a refusal seen through the client)
#   cache-all GRPC_URL HTTP_URL
#                             cold-warm GRPC_URL, warm-minimal GRPC_URL,
#                             cold-warm HTTP_URL, warm-minimal HTTP_URL
#   assets GRPC_URL           Remote Asset API: a small workspace with an http_archive
#                             and an http_file served by a local HTTP server, built
#                             with --experimental_remote_downloader=GRPC_URL; then the
#                             HTTP server stops, the repository cache and output base
#                             are wiped, and the build must still succeed, served by
#                             the remote downloader
#   clean                     delete the state directory
#
# URL is grpc://HOST:PORT or http://HOST:PORT (grpcs:// and https:// for TLS, with
# --tls_certificate and friends in BAZEL_E2E_FLAGS); disk:///ABS/PATH uses Bazel's
# --disk_cache instead (same cache-hit code path in Bazel, no server needed:
# it checks this script itself). warm* reuse the salt of the last cold* run
# against the same URL (or the last cold* run at all), so
#   cold-warm URL; <SIGKILL and restart the server>; warm URL
# tests persistence. --salt S forces a salt.
#
# Environment:
#   BAZEL_E2E_DIR      state: workspaces, logs, output bases (default $TMPDIR/cairn-bazel-e2e)
#   BAZEL_E2E_JOBS     --jobs (default 8)
#   BAZEL_E2E_XMX      Bazel server heap (default 1g)
#   BAZEL_E2E_TIMEOUT  seconds per Bazel invocation before it is killed (default 900)
#   BAZEL_E2E_FLAGS    extra build flags, e.g. "--remote_instance_name=main"
#   BAZEL_E2E_STARTUP_FLAGS
#                      extra startup options (before `build`), e.g.
#                      "--bazelrc=FILE" for flags whose values hold spaces, or
#                      "--host_jvm_args=-Djava.library.path=DIR" (TLS, see README)
#   BAZEL_E2E_EXEC_CACHE
#                      exec phases only: a separate cache (--remote_cache=URL next
#                      to --remote_executor), for an executor that does not serve
#                      the CAS itself, e.g. grpc://CACHE:50051 with
#                      exec grpc://SCHEDULER:50061 (default: the executor's URL)
#   BAZEL_E2E_EXEC_COLD_KIND
#                      what exec-cold expects of every action: remote (default: run
#                      remotely) or executor (run remotely or answered from the
#                      executor's cache, as after a retried Execute; never local)
#   BAZEL_E2E_GRPC_LOG failure (default): on a failed check, rerun that build with
#                      --experimental_remote_grpc_log; always; never
#   BAZEL_E2E_KEEP=1   keep output bases (default: deleted after each build)
#   BAZEL              the bazel binary (default: bazel on PATH)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
GEN="$HERE/bazel-e2e/gen_workspace.py"
STATE="${BAZEL_E2E_DIR:-${TMPDIR:-/tmp}/cairn-bazel-e2e}"
JOBS="${BAZEL_E2E_JOBS:-8}"
XMX="${BAZEL_E2E_XMX:-1g}"
TIMEOUT="${BAZEL_E2E_TIMEOUT:-900}"
GRPC_LOG_MODE="${BAZEL_E2E_GRPC_LOG:-failure}"
BAZEL="${BAZEL:-bazel}"
read -r -a EXTRA_FLAGS <<<"${BAZEL_E2E_FLAGS:-}"
read -r -a STARTUP_FLAGS <<<"${BAZEL_E2E_STARTUP_FLAGS:-}"
FORCED_SALT=""

log() { printf '[bazel-e2e %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

# ---------------------------------------------------------------------------
# The one parser. Reads Bazel's console output on stdin and prints, for the last
# "INFO: <N> process(es)[: <count> <runner>, ...]." line,
#   TOTAL HITS INTERNAL REMOTE OTHER
# where HITS counts "remote cache hit" (also Bazel's word for --disk_cache hits),
# REMOTE counts remotely executed spawns and OTHER everything that ran locally
# (linux-sandbox, processwrapper-sandbox, local, worker, ...).
# Exit 1: no such line; exit 2: the counts do not add up to the total.
# Bazel 4.2.3 (SpawnStats) lists "remote cache hit" first, then "internal", then
# the other runners alphabetically:
#   INFO: 135 processes: 1 internal, 134 linux-sandbox.
#   INFO: 135 processes: 134 remote cache hit, 1 internal.
#   INFO: 135 processes: 1 internal, 134 remote.
parse_processes() {
  awk '
    { gsub(/\r/, ""); gsub(/\033\[[0-9;]*[A-Za-z]/, "") }
    /^INFO: [0-9]+ process(es)?(: .*)?\.$/ { line = $0 }
    END {
      if (line == "") exit 1
      s = line; sub(/^INFO: /, "", s); sub(/\.$/, "", s)
      total = s; sub(/ .*/, "", total); total += 0
      hit = 0; internal = 0; remote = 0; other = 0; sum = 0
      if (sub(/^[0-9]+ process(es)?: /, "", s)) {
        n = split(s, parts, /, /)
        for (i = 1; i <= n; i++) {
          if (parts[i] !~ /^[0-9]+ [^,]+$/) exit 2
          cnt = parts[i]; sub(/ .*/, "", cnt); cnt += 0
          name = parts[i]; sub(/^[0-9]+ /, "", name)
          sum += cnt
          if (name == "remote cache hit") hit += cnt
          else if (name == "internal") internal += cnt
          else if (name == "remote") remote += cnt
          else other += cnt
        }
      }
      if (sum != total) exit 2
      print total, hit, internal, remote, other
    }'
}

selftest() {
  local fails=0
  check() { # input expected-output expected-rc
    local out rc=0
    out=$(printf '%b' "$1" | parse_processes) || rc=$?
    if [ "$rc" != "$3" ] || [ "$out" != "$2" ]; then
      log "selftest: input [$1]: got [$out] rc=$rc, want [$2] rc=$3"
      fails=$((fails + 1))
    fi
  }
  # Lines captured from Debian's Bazel 4.2.3 on the generated workspace:
  check 'INFO: 135 processes: 1 internal, 134 linux-sandbox.\n' '135 0 1 0 134' 0          # cold, local
  check 'INFO: 135 processes: 134 remote cache hit, 1 internal.\n' '135 134 1 0 0' 0       # warm (--disk_cache)
  check 'INFO: 0 processes.\n' '0 0 0 0 0' 0                                               # nothing ran
  check 'INFO: Elapsed time: 2.467s, Critical Path: 0.31s\nINFO: 135 processes: 134 remote cache hit, 1 internal.\nINFO: Build completed successfully, 135 total actions\n' '135 134 1 0 0' 0
  # Shapes Bazel 4.2.3's SpawnStats produces for remote execution and mixes:
  check 'INFO: 135 processes: 1 internal, 134 remote.\n' '135 0 1 134 0' 0
  check 'INFO: 11 processes: 6 remote cache hit, 3 internal, 2 remote.\n' '11 6 3 2 0' 0
  check 'INFO: 135 processes: 100 remote cache hit, 1 internal, 30 linux-sandbox, 4 remote.\n' '135 100 1 4 30' 0
  check 'INFO: 1 process: 1 internal.\n' '1 0 1 0 0' 0
  check 'INFO: 135 processes: 1 internal, 134 processwrapper-sandbox.\n' '135 0 1 0 134' 0
  check 'INFO: 7 processes: 2 internal, 5 local.\r\n' '7 0 2 0 5' 0
  check '\033[32mINFO: \033[0m5 processes: 5 remote cache hit.\n' '5 5 0 0 0' 0
  # The last summary line wins (a log holding two builds).
  check 'INFO: 3 processes: 3 linux-sandbox.\nINFO: 3 processes: 3 remote cache hit.\n' '3 3 0 0 0' 0
  # Broken inputs.
  check 'INFO: Build completed successfully, 135 total actions\n' '' 1
  check '' '' 1
  check 'INFO: 10 processes: 1 internal, 8 remote cache hit.\n' '' 2
  check 'INFO: 10 processes: 1 internal, lots remote.\n' '' 2
  # The assertion helpers.
  local t
  t=$(printf 'INFO: 135 processes: 134 remote cache hit, 1 internal.\n')
  (expect_counts hits 134 <<<"$t") >/dev/null 2>&1 || { log "selftest: hits 134 rejected"; fails=$((fails + 1)); }
  (expect_counts hits 135 <<<"$t") >/dev/null 2>&1 && { log "selftest: hits 135 accepted"; fails=$((fails + 1)); }
  (expect_counts local 134 <<<"$t") >/dev/null 2>&1 && { log "selftest: local accepted hits"; fails=$((fails + 1)); }
  t=$(printf 'INFO: 135 processes: 133 remote cache hit, 1 internal, 1 linux-sandbox.\n')
  (expect_counts hits 134 <<<"$t") >/dev/null 2>&1 && { log "selftest: a local miss accepted"; fails=$((fails + 1)); }
  t=$(printf 'INFO: 135 processes: 1 internal, 134 remote.\n')
  (expect_counts remote 134 <<<"$t") >/dev/null 2>&1 || { log "selftest: remote 134 rejected"; fails=$((fails + 1)); }
  (expect_counts hits 134 <<<"$t") >/dev/null 2>&1 && { log "selftest: remote accepted as hits"; fails=$((fails + 1)); }
  if [ "$fails" -ne 0 ]; then die "selftest: $fails check(s) failed"; fi
  log "selftest: parser ok"
}

# expect_counts KIND N < log: KIND is hits|local|remote; exactly N spawns of that
# kind and none of any other kind except "internal". Prints the verdict.
expect_counts() {
  local kind=$1 want=$2 parsed total hit internal remote other rc=0
  parsed=$(parse_processes) || rc=$?
  case $rc in
    0) ;;
    1) echo "no 'INFO: N processes' line in Bazel's output"; return 1 ;;
    *) echo "unparseable 'INFO: N processes' line"; return 1 ;;
  esac
  read -r total hit internal remote other <<<"$parsed"
  local h=0 r=0 o=0
  case $kind in
    hits) h=$want ;;
    remote) r=$want ;;
    local) o=$want ;;
    # Every action answered by the executor: run remotely, or answered from its cache
    # (an Execute retried after its stream broke finds the result already stored).
    executor) r=$((want - hit)); h=$hit ;;
    *) echo "bad kind $kind"; return 1 ;;
  esac
  if [ "$hit" -eq "$h" ] && [ "$remote" -eq "$r" ] && [ "$other" -eq "$o" ]; then
    echo "ok: $total processes = $hit remote cache hit + $remote remote + $other local + $internal internal"
    return 0
  fi
  echo "want $want $kind; got $hit remote cache hit, $remote remote, $other local, $internal internal (of $total)"
  return 1
}

# ---------------------------------------------------------------------------
# Workspace, salts and Bazel invocations.

url_key() { printf '%s' "$1" | tr -c 'A-Za-z0-9' '_'; }

new_salt() {
  if [ -n "$FORCED_SALT" ]; then printf '%s' "$FORCED_SALT"; return; fi
  python3 -c 'import secrets; print(secrets.token_hex(6))'
}

record_salt() { # url salt
  mkdir -p "$STATE"
  printf '%s\n' "$2" >"$STATE/salt.$(url_key "$1")"
  printf '%s\n' "$2" >"$STATE/salt.last"
}

salt_for() { # url
  if [ -n "$FORCED_SALT" ]; then printf '%s' "$FORCED_SALT"; return; fi
  local f="$STATE/salt.$(url_key "$1")"
  [ -f "$f" ] || f="$STATE/salt.last"
  [ -f "$f" ] || die "no salt recorded for $1: run a cold phase first or pass --salt"
  cat "$f"
}

WS=""
workspace() { # salt -> sets WS
  WS="$STATE/ws-$1"
  if [ ! -f "$WS/SALT" ] || [ "$(cat "$WS/SALT")" != "$1" ]; then
    python3 "$GEN" "$WS" --salt "$1" >&2
  fi
  EXPECTED=$(cat "$WS/EXPECTED_ACTIONS")
  [ "$EXPECTED" -ge 100 ] || die "workspace has only $EXPECTED actions"
}

remote_flags() { # mode url -> REMOTE_FLAGS
  local mode=$1 url=$2
  REMOTE_FLAGS=()
  if [ "$mode" = none ]; then return 0; fi
  case $url in
    grpc://*|grpcs://*|http://*|https://*) ;;
    disk://*) REMOTE_FLAGS=(--disk_cache="${url#disk://}")
              if [ "$mode" = exec ]; then die "exec phases need a grpc:// URL"; fi
              return 0 ;;
    *) die "unsupported URL '$url' (grpc://HOST:PORT, http://HOST:PORT or disk:///PATH)" ;;
  esac
  case $mode in
    cache) REMOTE_FLAGS=(--remote_cache="$url") ;;
    exec)  case $url in grpc*) ;; *) die "exec phases need a grpc:// URL" ;; esac
           REMOTE_FLAGS=(--remote_executor="$url")
           if [ -n "${BAZEL_E2E_EXEC_CACHE:-}" ]; then
             REMOTE_FLAGS+=(--remote_cache="$BAZEL_E2E_EXEC_CACHE")
           fi ;;
  esac
}

BUILD_N=0
LAST_LOG=""
LAST_OB=""
# run_bazel NAME [build flags...]: one build of //... in $WS with a fresh output
# base; output in $LAST_LOG. Returns Bazel's exit code.
run_bazel() {
  local name=$1; shift
  BUILD_N=$((BUILD_N + 1))
  mkdir -p "$STATE/logs" "$STATE/ob"
  local tag
  tag="$(date +%H%M%S)-$$-$BUILD_N-$name"
  LAST_LOG="$STATE/logs/$tag.log"
  LAST_OB="$STATE/ob/$tag"
  rm_tree "$LAST_OB"
  local t0 rc=0
  t0=$(date +%s.%N)
  # --batch: no Bazel server outlives the command; the JVM is the process we
  # start (the client execs it), so the timeout's kill reaches it.
  ( cd "$WS" && exec timeout --kill-after=20 "$TIMEOUT" "$BAZEL" \
      --nohome_rc --batch --output_base="$LAST_OB" \
      --host_jvm_args=-Xmx"$XMX" --host_jvm_args=-Xms64m \
      ${STARTUP_FLAGS[@]+"${STARTUP_FLAGS[@]}"} \
      build --curses=no --color=no --show_progress_rate_limit=10 \
      --jobs="$JOBS" --verbose_failures --remote_timeout=120 \
      "$@" ${EXTRA_FLAGS[@]+"${EXTRA_FLAGS[@]}"} //... ) >"$LAST_LOG" 2>&1 &
  BZ_PID=$!
  wait "$BZ_PID" || rc=$?
  BZ_PID=""
  LAST_SECS=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  if [ "$rc" -eq 124 ]; then log "$name: Bazel killed after ${TIMEOUT}s"; fi
  return "$rc"
}

# If this script is stopped, stop the Bazel it started: `timeout` (our child)
# relays the signal; whatever is left of its own children gets SIGKILL by PID.
BZ_PID=""
stop_bazel() {
  [ -n "$BZ_PID" ] || return 0
  local kids
  kids=$(pgrep -P "$BZ_PID" 2>/dev/null || true)
  kill -TERM "$BZ_PID" 2>/dev/null || true
  local i
  for i in $(seq 1 20); do kill -0 "$BZ_PID" 2>/dev/null || break; sleep 0.5; done
  kill -KILL "$BZ_PID" 2>/dev/null || true
  for i in $kids; do kill -KILL "$i" 2>/dev/null || true; done
  BZ_PID=""
}
# The assets phase's HTTP server, stopped by PID.
ORIGIN_PID=""
stop_origin() {
  [ -n "$ORIGIN_PID" ] || return 0
  kill -TERM "$ORIGIN_PID" 2>/dev/null || true
  wait "$ORIGIN_PID" 2>/dev/null || true
  ORIGIN_PID=""
}
cleanup() {
  stop_bazel
  stop_origin
  if [ -n "$LAST_OB" ]; then done_with_ob; fi
}
trap 'cleanup' EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

rm_tree() { [ -e "$1" ] || return 0; chmod -R u+w "$1" 2>/dev/null || true; rm -rf "$1"; }

done_with_ob() { [ "${BAZEL_E2E_KEEP:-0}" = 1 ] || rm_tree "$LAST_OB"; }

bin_dir() { printf '%s' "$LAST_OB/execroot/cairn_e2e/bazel-out/k8-fastbuild/bin"; }

output_sums() { # -> sorted "sha256  path" of every output of the last build
  ( cd "$(bin_dir)" && find . -type f -print0 | sort -z | xargs -0 -r sha256sum )
}

show_failure() { # what
  log "$1"
  log "---- last 60 lines of $LAST_LOG ----"
  tail -n 60 "$LAST_LOG" >&2 || true
  log "---- end (full log: $LAST_LOG) ----"
}

# Bazel reports remote-cache write/read problems as warnings and carries on.
check_remote_warnings() {
  if grep -nE 'Writing to Remote Cache|Reading from Remote Cache|Upload to remote cache failed|failed be uploaded to the remote cache|Failed to query remote execution capabilities|remote cache.*(UNAVAILABLE|DEADLINE_EXCEEDED)' "$LAST_LOG" >&2; then
    return 1
  fi
}

# On a failed check against a gRPC endpoint, build again with a call log.
grpc_debug_rerun() { # name mode url flags...
  local name=$1 mode=$2 url=$3; shift 3
  [ "$GRPC_LOG_MODE" = failure ] || return 0
  case $url in grpc*) ;; *) return 0 ;; esac
  local glog="$STATE/logs/$name-$$-$BUILD_N.grpc.log"
  local flog=$LAST_LOG
  log "$name: rebuilding once with --experimental_remote_grpc_log=$glog"
  run_bazel "$name-debug" "$@" --experimental_remote_grpc_log="$glog" || true
  log "$name: debug build: $(grep -E '^INFO: [0-9]+ process' "$LAST_LOG" | tail -1) (log $LAST_LOG)"
  if [ -s "$glog" ]; then
    log "$name: calls in $glog:"
    grep -aoE '(build\.bazel\.remote\.execution\.v2|google\.bytestream|google\.longrunning)\.[A-Za-z]+/[A-Za-z]+' "$glog" \
      | sort | uniq -c >&2 || true
  fi
  done_with_ob
  LAST_LOG=$flog
  LAST_OB=""
}

# build_and_expect NAME MODE URL KIND [extra flags...]
build_and_expect() {
  local name=$1 mode=$2 url=$3 kind=$4; shift 4
  remote_flags "$mode" "$url"
  local flags=(${REMOTE_FLAGS[@]+"${REMOTE_FLAGS[@]}"} "$@")
  if [ "$GRPC_LOG_MODE" = always ]; then
    case $url in grpc*) flags+=(--experimental_remote_grpc_log="$STATE/logs/$name-$$-$((BUILD_N + 1)).grpc.log") ;; esac
  fi
  log "$name: bazel build //... ${flags[*]} (salt $(cat "$WS/SALT"), $EXPECTED actions)"
  local rc=0 verdict
  run_bazel "$name" "${flags[@]}" || rc=$?
  if [ "$rc" -ne 0 ]; then
    show_failure "$name: Bazel exited with $rc after ${LAST_SECS}s"
    done_with_ob
    grpc_debug_rerun "$name" "$mode" "$url" "${flags[@]}"
    die "$name: build failed"
  fi
  if ! verdict=$(expect_counts "$kind" "$EXPECTED" <"$LAST_LOG"); then
    show_failure "$name: $verdict"
    done_with_ob
    grpc_debug_rerun "$name" "$mode" "$url" "${flags[@]}"
    die "$name: $verdict"
  fi
  if [ "$url" != "" ] && ! check_remote_warnings; then
    show_failure "$name: Bazel reported remote cache errors (lines above)"
    done_with_ob
    die "$name: remote cache errors"
  fi
  log "$name: $verdict (${LAST_SECS}s): $(grep -E '^INFO: [0-9]+ process' "$LAST_LOG" | tail -1)"
}

# ---------------------------------------------------------------------------
# Phases.

phase_local() {
  workspace "$(new_salt)"
  build_and_expect local none "" local
  local n
  n=$(output_sums | wc -l)
  log "local: $n output files, $(du -sm "$(bin_dir)" | cut -f1) MiB"
  done_with_ob
}

phase_cold() { # url
  local url=$1 salt
  salt=$(new_salt)
  workspace "$salt"
  build_and_expect "cold" cache "$url" local
  output_sums >"$STATE/outputs-$salt.sha256"
  done_with_ob
  record_salt "$url" "$salt"
}

phase_warm() { # url [minimal]
  local url=$1 minimal=${2:-} salt name=warm
  salt=$(salt_for "$url")
  workspace "$salt"
  local extra=()
  if [ -n "$minimal" ]; then extra=(--remote_download_minimal); name=warm-minimal; fi
  build_and_expect "$name" cache "$url" hits ${extra[@]+"${extra[@]}"}
  local want="$STATE/outputs-$salt.sha256"
  if [ -z "$minimal" ] && [ -f "$want" ]; then
    if ! output_sums | cmp -s - "$want"; then
      output_sums | diff "$want" - | head -20 >&2 || true
      done_with_ob
      die "$name: downloaded outputs differ from the cold build's"
    fi
    log "$name: all $(wc -l <"$want") downloaded outputs match the cold build byte for byte"
  elif [ -n "$minimal" ]; then
    log "$name: $(find "$(bin_dir)" -type f 2>/dev/null | wc -l) output files materialized locally"
  fi
  done_with_ob
}

phase_exec_cold() { # url
  local url=$1 salt
  salt=$(new_salt)
  workspace "$salt"
  build_and_expect "exec-cold" exec "$url" "${BAZEL_E2E_EXEC_COLD_KIND:-remote}"
  local got="$STATE/outputs-$salt.remote.sha256"
  output_sums >"$got"
  done_with_ob
  # What the executor produced must be byte-identical to a local build.
  build_and_expect "exec-reference" none "" local
  output_sums >"$STATE/outputs-$salt.sha256"
  done_with_ob
  if ! cmp -s "$got" "$STATE/outputs-$salt.sha256"; then
    diff "$STATE/outputs-$salt.sha256" "$got" | head -20 >&2 || true
    die "exec-cold: remotely built outputs differ from a local build's"
  fi
  log "exec-cold: all $(wc -l <"$got") remotely built outputs match a local build byte for byte"
  record_salt "$url" "$salt"
}

phase_exec_warm() { # url
  local url=$1 salt
  salt=$(salt_for "$url")
  workspace "$salt"
  build_and_expect "exec-warm" exec "$url" hits
  if [ -f "$STATE/outputs-$salt.sha256" ] && ! output_sums | cmp -s - "$STATE/outputs-$salt.sha256"; then
    done_with_ob
    die "exec-warm: downloaded outputs differ from the cold build's"
  fi
  done_with_ob
}

phase_refused() { # url regex
  local url=$1 regex=$2 salt rc=0 line
  salt=$(new_salt)
  workspace "$salt"
  remote_flags cache "$url"
  log "refused: bazel build //... ${REMOTE_FLAGS[*]} (salt $salt), expecting a line matching /$regex/"
  run_bazel refused ${REMOTE_FLAGS[@]+"${REMOTE_FLAGS[@]}"} || rc=$?
  done_with_ob
  if ! line=$(grep -m1 -E -- "$regex" "$LAST_LOG"); then
    show_failure "refused: no line matching /$regex/ in Bazel's output (exit $rc after ${LAST_SECS}s)"
    die "refused: Bazel's output does not show the refusal"
  fi
  log "refused: Bazel exited with $rc after ${LAST_SECS}s: $line"
  record_salt "$url" "$salt"
}

phase_assets() { # grpc url
  local url=$1 salt port origin repo_cache
  case $url in grpc://*) ;; *) die "assets needs a grpc:// URL (the Remote Asset API is gRPC)" ;; esac
  salt=$(new_salt)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  origin="http://127.0.0.1:$port"
  WS="$STATE/assets-$salt"
  python3 "$GEN" "$WS" --salt "$salt" --assets-url "$origin" >&2
  EXPECTED=$(cat "$WS/EXPECTED_ACTIONS")
  mkdir -p "$STATE/logs"
  local origin_log="$STATE/logs/assets-origin-$salt.log"
  ( cd "$WS/served" && exec python3 -m http.server "$port" --bind 127.0.0.1 ) >"$origin_log" 2>&1 &
  ORIGIN_PID=$!
  local i
  for i in $(seq 1 100); do
    curl -fsS -o /dev/null "$origin/" 2>/dev/null && break
    kill -0 "$ORIGIN_PID" 2>/dev/null || die "assets: the HTTP server exited: $(cat "$origin_log")"
    sleep 0.1
  done
  curl -fsS -o /dev/null "$origin/" || die "assets: the HTTP server on $origin did not answer"
  repo_cache="$STATE/repository-cache-$salt"
  rm_tree "$repo_cache"
  local flags=(--experimental_remote_downloader="$url" --repository_cache="$repo_cache")
  local want
  want=$(cat "$WS/EXPECTED_ASSETS_SUM")

  build_and_expect assets-online cache "$url" local "${flags[@]}"
  [ "$(cat "$(bin_dir)/assets.sha256")" = "$want" ] || die "assets-online: wrong output from the fetched files"
  done_with_ob
  local gets
  gets=$(grep -cE '"GET /(dep|tool)-' "$origin_log" || true)
  [ "$gets" -ge 2 ] || die "assets-online: the HTTP server saw $gets downloads, want both files"
  log "assets-online: the remote downloader fetched both files ($gets GETs at the origin)"

  stop_origin
  if curl -fsS -o /dev/null "$origin/" 2>/dev/null; then die "assets: the HTTP server still answers"; fi
  rm_tree "$repo_cache"
  build_and_expect assets-offline cache "$url" hits "${flags[@]}"
  [ "$(cat "$(bin_dir)/assets.sha256")" = "$want" ] || die "assets-offline: wrong output from the cached files"
  done_with_ob
  log "assets-offline: with the origin down and Bazel's caches wiped, both files came from the remote downloader"
}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }

need_bazel() {
  command -v "$BAZEL" >/dev/null 2>&1 || die "'$BAZEL' not found: run scripts/install-deps.sh"
  command -v python3 >/dev/null 2>&1 || die "python3 not found: run scripts/install-deps.sh"
}

main() {
  while [ $# -gt 0 ]; do
    case $1 in
      --salt) FORCED_SALT=${2:?--salt needs a value}; shift 2 ;;
      --salt=*) FORCED_SALT=${1#--salt=}; shift ;;
      -h|--help) usage ;;
      *) break ;;
    esac
  done
  local phase=${1:-}; shift || true
  local t0=$SECONDS
  case $phase in
    selftest) selftest; return ;;
    clean) rm_tree "$STATE"; log "removed $STATE"; return ;;
    local) need_bazel; phase_local ;;
    cold) need_bazel; phase_cold "${1:?URL}" ;;
    warm) need_bazel; phase_warm "${1:?URL}" ;;
    warm-minimal) need_bazel; phase_warm "${1:?URL}" minimal ;;
    cold-warm) need_bazel; phase_cold "${1:?URL}"; phase_warm "$1" ;;
    exec-cold) need_bazel; phase_exec_cold "${1:?URL}" ;;
    exec-warm) need_bazel; phase_exec_warm "${1:?URL}" ;;
    exec) need_bazel; phase_exec_cold "${1:?URL}"; phase_exec_warm "$1" ;;
    refused) need_bazel; phase_refused "${1:?URL}" "${2:?REGEX}" ;;
    cache-all)
      need_bazel
      local g=${1:?GRPC_URL} h=${2:?HTTP_URL}
      phase_cold "$g"; phase_warm "$g"; phase_warm "$g" minimal
      phase_cold "$h"; phase_warm "$h"; phase_warm "$h" minimal ;;
    assets) need_bazel; phase_assets "${1:?GRPC_URL}" ;;
    *) usage ;;
  esac
  log "$phase: PASS in $((SECONDS - t0))s"
}

main "$@"
