#!/usr/bin/env bash
# Exercise scripts/bazel-e2e.sh end to end without any cairn server: the parser
# selftest, a local build, every cache phase against Bazel's --disk_cache (the
# same cache-hit path in Bazel as a remote cache), and the remote-execution
# phases against a stand-in that turns --remote_executor into --disk_cache and
# reports the spawns as "remote". It checks the driver, not a server.
# About a minute on two cores.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
E2E="$HERE/../bazel-e2e.sh"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/cairn-bazel-offline.XXXXXX")"
trap 'chmod -R u+w "$WORK" 2>/dev/null || true; rm -rf "$WORK"' EXIT
export BAZEL_E2E_DIR="$WORK/state"
REAL_BAZEL="${BAZEL:-bazel}"

cat >"$WORK/exec-as-disk-cache" <<EOS
#!/usr/bin/env bash
args=(); ex=0
for a in "\$@"; do
  case \$a in
    --remote_executor=*) ex=1; args+=(--disk_cache="$WORK/exec-dc") ;;
    *) args+=("\$a") ;;
  esac
done
if [ \$ex = 1 ]; then
  "$REAL_BAZEL" "\${args[@]}" 2>&1 | sed -E 's/([0-9]+) (linux-sandbox|processwrapper-sandbox|local)\\./\\1 remote./'
  exit \${PIPESTATUS[0]}
fi
exec "$REAL_BAZEL" "\${args[@]}"
EOS
chmod +x "$WORK/exec-as-disk-cache"

t0=$SECONDS
"$E2E" selftest
"$E2E" local
"$E2E" cache-all "disk://$WORK/dc-a" "disk://$WORK/dc-b"
"$E2E" warm "disk://$WORK/dc-a"          # salt recorded by an earlier invocation
BAZEL="$WORK/exec-as-disk-cache" "$E2E" exec grpc://127.0.0.1:9
# A cache that does not have the results must fail the warm check.
if BAZEL_E2E_GRPC_LOG=never "$E2E" warm "disk://$WORK/dc-empty" >"$WORK/neg.log" 2>&1; then
  echo "offline-check: a warm build against an empty cache passed" >&2; exit 1
fi
grep -q 'FAIL: warm: want' "$WORK/neg.log"
echo "offline-check: PASS in $((SECONDS - t0))s"
