#!/usr/bin/env python3
"""Generate an offline Bazel 4.2.3 workspace of genrule actions for cache tests.

    gen_workspace.py OUTDIR [--salt SALT]

The workspace needs nothing from the network: only genrules, and local stand-ins
for the three repositories Bazel 4.2.3 asks for on its own (@rules_cc,
@rules_java, @remote_coverage_tools). Every output is a deterministic function
of SALT, so two builds of workspaces generated with the same SALT have identical
action keys and outputs (a rebuild with a fresh output base hits the cache),
while a new SALT changes every action key and every large blob (a "cold" build
really is cold even against a cache that has seen earlier runs).

Files written at the workspace root besides the BUILD files:
  EXPECTED_ACTIONS  number of genrule actions (= spawns Bazel will run)
  EXPECTED_BYTES    total size of all declared outputs
  SALT              the salt used

    gen_workspace.py OUTDIR --salt SALT --assets-url http://127.0.0.1:PORT

generates instead the small workspace of the `assets` phase: an http_archive and an
http_file whose URLs point at PORT, their files (with the sha256 the WORKSPACE names)
in OUTDIR/served for an HTTP server to serve, and one genrule consuming both, whose
output must equal EXPECTED_ASSETS_SUM.
"""

import argparse
import gzip
import hashlib
import io
import os
import secrets
import shutil
import sys
import tarfile

KiB = 1024
MiB = 1024 * KiB
SEED_SIZE = 1 * MiB

# Sizes of the "bin" leaves: edges around ByteStream's 16 KiB chunks, the 4 MiB
# batch limit and 1 MiB boundaries, then a spread of ordinary sizes.
BIN_SIZES = [
    1, 100, 1023, 1024, 4095,
    16 * KiB - 1, 16 * KiB, 16 * KiB + 1, 64 * KiB, 100_000,
    256 * KiB, 500_000, MiB - 1, MiB, MiB + 1,
    2 * MiB, 3 * MiB + 7, 4 * MiB - 1, 4 * MiB, 4 * MiB + 1,
    5 * MiB, 6 * MiB + 12345, 2_000, 30_000, 123_456,
    777_777, 48 * KiB, 200 * KiB, 1_500_000, 333,
]
# Large leaves, made with head -c from a deterministic stream (~129 MiB).
BIG_SIZES = [16 * MiB, 17 * MiB + 3, 24 * MiB, 32 * MiB, 40 * MiB]
N_TXT = 40      # tiny text leaves (0 .. ~200 bytes), one of them empty
N_MIX = 30      # consume 2-4 small/medium leaves
N_AGG = 10      # consume 3 mixes each
CHAIN = 10      # a strictly sequential chain

BLOB_SH = r"""#!/bin/sh
# blob.sh SEED SIZE ROT: write SIZE deterministic bytes to stdout.
# The stream is SEED (1 MiB of pseudo-random bytes) repeated, block i having
# every byte rotated by (ROT + i) mod 256, so no 1 MiB block repeats within
# 256 MiB and nothing compresses. No pipe is ever cut short (genrules run
# under pipefail).
set -eu
LC_ALL=C
export LC_ALL
seed=$1
size=$2
rot=$3
bs=$(wc -c < "$seed")
rotate() { # rotate bytes of stdin by $1
  r=$(( $1 % 256 ))
  if [ "$r" -eq 0 ]; then cat; return; fi
  lo=$(printf '%03o' "$r")
  hi=$(printf '%03o' $(( r - 1 )))
  tr '\000-\377' "\\$lo-\\377\\000-\\$hi"
}
i=0
while [ "$size" -ge "$bs" ]; do
  rotate $(( rot + i )) < "$seed"
  size=$(( size - bs ))
  i=$(( i + 1 ))
done
if [ "$size" -gt 0 ]; then
  head -c "$size" "$seed" | rotate $(( rot + i ))
fi
"""


# A Starlark rule whose action declares a directory output (a tree artifact): files
# in nested sub-directories, an empty file and an executable, plus a copy of an input.
# Genrules cannot declare one, and remote execution stores such an output as a Tree,
# so the warm builds check that path of the action cache too.
TREE_BZL = r"""'''Directory outputs (tree artifacts) for the cache tests.'''

_MAKE_TREE = '''set -eu
d=$1
salt=$2
input=$3
for sub in . a a/b a/b/c a/d e; do
  mkdir -p "$d/$sub"
  for n in 1 2 3 4 5; do
    printf '%s %s %s\\n' "$salt" "$sub" "$n" > "$d/$sub/f$n.txt"
  done
done
: > "$d/a/b/empty"
printf '#!/bin/sh\\necho %s\\n' "$salt" > "$d/a/run.sh"
chmod +x "$d/a/run.sh"
cp "$input" "$d/e/input.bin"
'''

def _tree_impl(ctx):
    out = ctx.actions.declare_directory(ctx.attr.name + ".d")
    ctx.actions.run_shell(
        outputs = [out],
        inputs = [ctx.file.src],
        command = _MAKE_TREE,
        arguments = [out.path, ctx.attr.salt, ctx.file.src.path],
        mnemonic = "CairnTree",
    )
    return [DefaultInfo(files = depset([out]))]

tree = rule(
    implementation = _tree_impl,
    attrs = {
        "salt": attr.string(mandatory = True),
        "src": attr.label(allow_single_file = True, mandatory = True),
    },
)

# -L: a local sandbox presents inputs as symlinks into the exec root. Modes are not
# listed: Bazel 4.2.3 makes every output and every remote input executable.
_LIST_TREE = '''set -eu
out=$PWD/$2
cd "$1"
find -L . -type f | LC_ALL=C sort | xargs sha256sum > "$out"
'''

def _tree_sums_impl(ctx):
    out = ctx.actions.declare_file(ctx.attr.name + ".sha256")
    tree = ctx.files.tree[0]
    ctx.actions.run_shell(
        outputs = [out],
        inputs = [tree],
        command = _LIST_TREE,
        arguments = [tree.path, out.path],
        mnemonic = "CairnTreeSums",
    )
    return [DefaultInfo(files = depset([out]))]

tree_sums = rule(
    implementation = _tree_sums_impl,
    attrs = {"tree": attr.label(mandatory = True)},
)
"""


def seed_bytes(salt: str, size: int) -> bytes:
    out = bytearray()
    ctr = 0
    key = ("cairn-e2e-seed/" + salt).encode()
    while len(out) < size:
        out += hashlib.sha256(key + ctr.to_bytes(8, "little")).digest()
        ctr += 1
    return bytes(out[:size])


def det(salt: str, name: str, mod: int) -> int:
    """Deterministic small integer from salt and name."""
    h = hashlib.sha256((salt + "/" + name).encode()).digest()
    return int.from_bytes(h[:8], "little") % mod


def write(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)


def q(s: str) -> str:
    """Starlark string literal."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class Pkg:
    def __init__(self, salt: str):
        self.salt = salt
        self.rules = []
        self.count = 0
        self.bytes = 0

    def genrule(self, name, outs, cmd, srcs=(), tools=(), size=0, executable=False):
        # Every command starts with the salt so that every action key depends on it.
        full = ": salt=%s; %s" % (self.salt, cmd)
        lines = ["genrule(", "    name = %s," % q(name)]
        if srcs:
            lines.append("    srcs = [%s]," % ", ".join(q(s) for s in srcs))
        lines.append("    outs = [%s]," % ", ".join(q(o) for o in outs))
        if tools:
            lines.append("    tools = [%s]," % ", ".join(q(t) for t in tools))
        lines.append("    cmd = %s," % q(full))
        if executable:
            lines.append("    executable = True,")
        lines.append(")")
        self.rules.append("\n".join(lines))
        self.count += 1
        self.bytes += size

    def starlark(self, text, size=0):
        """A rule of tools/tree.bzl: one action."""
        self.rules.append(text)
        self.count += 1
        self.bytes += size

    def text(self):
        return ('# Generated by gen_workspace.py; do not edit.\n'
                'load("//tools:tree.bzl", "tree", "tree_sums")\n\n'
                'package(default_visibility = ["//visibility:public"])\n\n'
                + "\n\n".join(self.rules) + "\n")


def stand_ins(ws: str) -> None:
    tp = os.path.join(ws, "third_party")
    # @rules_cc
    write(os.path.join(tp, "rules_cc", "WORKSPACE"), 'workspace(name = "rules_cc")\n')
    write(os.path.join(tp, "rules_cc", "BUILD"), "")
    cc_defs = (
        '"""Stand-in for rules_cc: re-exports the native C++ rules."""\n'
        "def cc_binary(**kw):\n    native.cc_binary(**kw)\n\n"
        "def cc_import(**kw):\n    native.cc_import(**kw)\n\n"
        "def cc_library(**kw):\n    native.cc_library(**kw)\n\n"
        "def cc_test(**kw):\n    native.cc_test(**kw)\n\n"
        "def cc_proto_library(**kw):\n    native.cc_proto_library(**kw)\n\n"
        "def cc_toolchain(**kw):\n    native.cc_toolchain(**kw)\n\n"
        "def cc_toolchain_suite(**kw):\n    native.cc_toolchain_suite(**kw)\n\n"
        "def objc_library(**kw):\n    native.objc_library(**kw)\n"
    )
    write(os.path.join(tp, "rules_cc", "cc", "BUILD"), "")
    write(os.path.join(tp, "rules_cc", "cc", "defs.bzl"), cc_defs)
    write(os.path.join(tp, "rules_cc", "defs.bzl"), 'load("//cc:defs.bzl", _b = "cc_binary", _l = "cc_library", _t = "cc_test")\n'
          "cc_binary = _b\ncc_library = _l\ncc_test = _t\n")
    # @rules_java
    write(os.path.join(tp, "rules_java", "WORKSPACE"), 'workspace(name = "rules_java")\n')
    write(os.path.join(tp, "rules_java", "BUILD"), "")
    java_defs = (
        '"""Stand-in for rules_java: re-exports the native Java rules."""\n'
        "def java_binary(**kw):\n    native.java_binary(**kw)\n\n"
        "def java_import(**kw):\n    native.java_import(**kw)\n\n"
        "def java_library(**kw):\n    native.java_library(**kw)\n\n"
        "def java_test(**kw):\n    native.java_test(**kw)\n\n"
        "def java_plugin(**kw):\n    native.java_plugin(**kw)\n\n"
        "def java_toolchain(**kw):\n    native.java_toolchain(**kw)\n\n"
        "def java_runtime(**kw):\n    native.java_runtime(**kw)\n"
    )
    write(os.path.join(tp, "rules_java", "java", "BUILD"), "")
    write(os.path.join(tp, "rules_java", "java", "defs.bzl"), java_defs)
    write(os.path.join(tp, "rules_java", "defs.bzl"), 'load("//java:defs.bzl", _b = "java_binary", _l = "java_library", _t = "java_test")\n'
          "java_binary = _b\njava_library = _l\njava_test = _t\n")
    # @remote_coverage_tools: the labels test rules reference implicitly.
    write(os.path.join(tp, "remote_coverage_tools", "WORKSPACE"),
          'workspace(name = "remote_coverage_tools")\n')
    write(os.path.join(tp, "remote_coverage_tools", "BUILD"),
          'package(default_visibility = ["//visibility:public"])\n\n'
          'filegroup(name = "coverage_output_generator", srcs = [])\n'
          'filegroup(name = "coverage_report_generator", srcs = [])\n'
          'filegroup(name = "lcov_merger", srcs = [])\n'
          'filegroup(name = "Main", srcs = [])\n')


def generate(ws: str, salt: str) -> Pkg:
    if os.path.exists(ws):
        shutil.rmtree(ws)
    os.makedirs(ws)
    write(os.path.join(ws, "WORKSPACE"),
          'workspace(name = "cairn_e2e")\n\n'
          "# Offline stand-ins for repositories Bazel 4.2.3 would otherwise download.\n"
          'local_repository(name = "rules_cc", path = "third_party/rules_cc")\n'
          'local_repository(name = "rules_java", path = "third_party/rules_java")\n'
          'local_repository(name = "remote_coverage_tools", path = "third_party/remote_coverage_tools")\n')
    write(os.path.join(ws, ".bazelrc"),
          "build --nosandbox_debug\n"
          "build --incompatible_strict_action_env\n"
          "# No bazel-* convenience symlinks: every build here uses a fresh output base,\n"
          "# and //... would otherwise wander into a previous output base's symlinks.\n"
          "build --symlink_prefix=/\n")
    # The stand-in repositories live inside the workspace; keep //... out of them.
    write(os.path.join(ws, ".bazelignore"), "third_party\n")
    stand_ins(ws)

    # Source inputs: the seed and the data tool.
    write(os.path.join(ws, "tools", "blob.sh"), BLOB_SH, 0o755)
    write(os.path.join(ws, "tools", "tree.bzl"), TREE_BZL)
    write(os.path.join(ws, "tools", "BUILD"),
          'package(default_visibility = ["//visibility:public"])\n\nexports_files(["blob.sh"])\n')
    os.makedirs(os.path.join(ws, "data"), exist_ok=True)
    with open(os.path.join(ws, "data", "seed.bin"), "wb") as f:
        f.write(seed_bytes(salt, SEED_SIZE))
    write(os.path.join(ws, "data", "BUILD"),
          'package(default_visibility = ["//visibility:public"])\n\nexports_files(["seed.bin"])\n')

    p = Pkg(salt)
    SEED = "//data:seed.bin"
    BLOB = "//tools:blob.sh"
    blob = "/bin/sh $(location %s) $(location %s)" % (BLOB, SEED)

    # 1. Tiny text leaves: 0 to ~200 bytes; txt_0 is empty.
    txt_sizes = {}
    for i in range(N_TXT):
        name = "txt_%d" % i
        if i == 0:
            p.genrule(name, [name + ".txt"], ": > $@")
            txt_sizes[name] = 0
            continue
        n = [1, 2, 3, 5, 8][i - 1] if i < 6 else 1 + det(salt, name, 200)
        content = hashlib.sha256((salt + name).encode()).hexdigest() * 4
        content = content[:n]
        p.genrule(name, [name + ".txt"], "printf '%%s' '%s' > $@" % content, size=n)
        txt_sizes[name] = n

    # 2. Binary leaves from the seed, sizes from bytes to a few MiB.
    bin_sizes = {}
    for i, size in enumerate(BIN_SIZES):
        name = "bin_%d" % i
        p.genrule(name, [name + ".bin"], "%s %d %d > $@" % (blob, size, 7 * i + 1),
                  srcs=[SEED], tools=[BLOB], size=size)
        bin_sizes[name] = size

    # 3. Large leaves: tens of MiB.
    for i, size in enumerate(BIG_SIZES):
        name = "big_%d" % i
        p.genrule(name, [name + ".bin"], "%s %d %d > $@" % (blob, size, 50 * i + 3),
                  srcs=[SEED], tools=[BLOB], size=size)
        # A small output that depends on a large one.
        p.genrule(name + "_sum", [name + ".sha256"],
                  "sha256sum $(location :%s) > $@ && wc -c < $(location :%s) >> $@" % (name, name),
                  srcs=[":" + name], size=0)
    # A large output built from a large input.
    p.genrule("big_0_plus", ["big_0_plus.bin"],
              "cat $(location :big_0) $(location :txt_7) > $@",
              srcs=[":big_0", ":txt_7"], size=BIG_SIZES[0] + txt_sizes["txt_7"])

    # 4. Mixes of 2-4 small/medium leaves (only those under 1 MiB are concatenated).
    small_bins = [n for n, s in bin_sizes.items() if s < MiB]
    pool = ["txt_%d" % i for i in range(N_TXT)] + small_bins
    mixes = []
    for i in range(N_MIX):
        name = "mix_%d" % i
        k = 2 + det(salt, name, 3)
        picks = []
        for j in range(k):
            c = pool[(det(salt, "%s/%d" % (name, j), len(pool)) + i * 7 + j) % len(pool)]
            if c not in picks:
                picks.append(c)
        srcs = [":" + c for c in picks]
        locs = " ".join("$(location :%s)" % c for c in picks)
        size = sum(txt_sizes.get(c, bin_sizes.get(c, 0)) for c in picks)
        p.genrule(name, [name + ".out"], "cat %s > $@ && sha256sum %s >> $@" % (locs, locs),
                  srcs=srcs, size=size)
        mixes.append(name)

    # 5. Aggregates of 3 mixes each.
    aggs = []
    for i in range(N_AGG):
        name = "agg_%d" % i
        picks = [mixes[(3 * i + j) % N_MIX] for j in range(3)]
        locs = " ".join("$(location :%s)" % c for c in picks)
        p.genrule(name, [name + ".sha256"], "sha256sum %s > $@ && cat %s | wc -c >> $@" % (locs, locs),
                  srcs=[":" + c for c in picks])
        aggs.append(name)

    # 6. A sequential chain (the critical path).
    prev = None
    for i in range(CHAIN):
        name = "chain_%d" % i
        if prev is None:
            p.genrule(name, [name + ".txt"], "echo link-0 > $@")
        else:
            p.genrule(name, [name + ".txt"], "cat $(location :%s) > $@ && echo link-%d >> $@" % (prev, i),
                      srcs=[":" + prev])
        prev = name

    # 7. One action with several outputs, one in a subdirectory.
    p.genrule("split", ["split/a.bin", "split/b.bin", "split/sub/dir/c.bin"],
              "head -c 1000 $(location :bin_10) > $(location split/a.bin) && "
              "tail -c 1000 $(location :bin_10) > $(location split/b.bin) && "
              "cat $(location :txt_3) $(location :txt_4) > $(location split/sub/dir/c.bin)",
              srcs=[":bin_10", ":txt_3", ":txt_4"], size=2000 + txt_sizes["txt_3"] + txt_sizes["txt_4"])

    # 8. An executable output.
    p.genrule("tool_sh", ["tool.sh"],
              "printf '#!/bin/sh\\necho cairn-e2e\\n' > $@ && chmod +x $@", executable=True, size=25)

    # 9. A directory output (30 files in nested directories, an empty file, an
    #    executable and a copy of an input), and an action that reads it.
    p.starlark('tree(\n    name = "tree",\n    salt = %s,\n    src = ":bin_8",\n)' % q(salt),
               size=bin_sizes["bin_8"])
    p.starlark('tree_sums(\n    name = "tree_sums",\n    tree = ":tree",\n)')

    # 10. The manifest depends on (almost) everything.
    deps = aggs + ["big_%d_sum" % i for i in range(len(BIG_SIZES))] + [prev, "split", "tool_sh",
                                                                         "tree_sums"]
    locs = " ".join("$(locations :%s)" % c for c in deps)
    p.genrule("manifest", ["manifest.txt"], "sha256sum %s > $@" % locs, srcs=[":" + c for c in deps])

    write(os.path.join(ws, "BUILD"), p.text())
    write(os.path.join(ws, "EXPECTED_ACTIONS"), "%d\n" % p.count)
    write(os.path.join(ws, "EXPECTED_BYTES"), "%d\n" % p.bytes)
    write(os.path.join(ws, "SALT"), salt + "\n")
    return p


def generate_assets(ws: str, salt: str, base_url: str) -> Pkg:
    """The `assets` phase's workspace: external repositories fetched over HTTP."""
    if os.path.exists(ws):
        shutil.rmtree(ws)
    os.makedirs(ws)
    served = os.path.join(ws, "served")
    os.makedirs(served)
    seed = seed_bytes(salt, 256 * KiB)
    # The archive: a repository of its own, under a top directory to strip.
    payload = ("asset payload, salt %s\n" % salt).encode() + seed[:100 * KiB]
    files = {
        "dep-%s/WORKSPACE" % salt: b'workspace(name = "asset_archive")\n',
        "dep-%s/BUILD" % salt: b'exports_files(["payload.txt"])\n',
        "dep-%s/payload.txt" % salt: payload,
    }
    buf = io.BytesIO()
    # Fixed mtimes and owners: the archive's bytes, hence its sha256, follow the salt.
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    archive = buf.getvalue()
    plain = seed[100 * KiB:]
    archive_name = "dep-%s.tar.gz" % salt
    file_name = "tool-%s.bin" % salt
    with open(os.path.join(served, archive_name), "wb") as f:
        f.write(archive)
    with open(os.path.join(served, file_name), "wb") as f:
        f.write(plain)
    write(os.path.join(ws, "WORKSPACE"),
          'workspace(name = "cairn_e2e")\n\n'
          'local_repository(name = "rules_cc", path = "third_party/rules_cc")\n'
          'local_repository(name = "rules_java", path = "third_party/rules_java")\n'
          'local_repository(name = "remote_coverage_tools", path = "third_party/remote_coverage_tools")\n\n'
          'load("@bazel_tools//tools/build_defs/repo:http.bzl", "http_archive", "http_file")\n\n'
          "http_archive(\n"
          '    name = "asset_archive",\n'
          "    urls = [%s],\n"
          "    sha256 = %s,\n"
          "    strip_prefix = %s,\n"
          ")\n\n"
          "http_file(\n"
          '    name = "asset_file",\n'
          "    urls = [%s],\n"
          "    sha256 = %s,\n"
          '    downloaded_file_path = "tool.bin",\n'
          ")\n"
          % (q(base_url + "/" + archive_name), q(hashlib.sha256(archive).hexdigest()),
             q("dep-%s" % salt), q(base_url + "/" + file_name),
             q(hashlib.sha256(plain).hexdigest())))
    write(os.path.join(ws, ".bazelrc"),
          "build --nosandbox_debug\n"
          "build --incompatible_strict_action_env\n"
          "build --symlink_prefix=/\n")
    write(os.path.join(ws, ".bazelignore"), "third_party\nserved\n")
    stand_ins(ws)
    p = Pkg(salt)
    p.genrule("use_assets", ["assets.sha256"],
              "cat $(location @asset_archive//:payload.txt) $(location @asset_file//file)"
              " | sha256sum | cut -c1-64 > $@",
              srcs=["@asset_archive//:payload.txt", "@asset_file//file"], size=65)
    write(os.path.join(ws, "BUILD"), "# Generated by gen_workspace.py; do not edit.\n\n"
          + "\n\n".join(p.rules) + "\n")
    write(os.path.join(ws, "EXPECTED_ACTIONS"), "%d\n" % p.count)
    write(os.path.join(ws, "EXPECTED_BYTES"), "%d\n" % p.bytes)
    write(os.path.join(ws, "EXPECTED_ASSETS_SUM"), hashlib.sha256(payload + plain).hexdigest() + "\n")
    write(os.path.join(ws, "SALT"), salt + "\n")
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir", help="workspace directory to (re)create")
    ap.add_argument("--salt", default=None, help="changes every action key (default: random)")
    ap.add_argument("--assets-url", default=None,
                    help="generate the assets phase's workspace, its files served at this URL")
    a = ap.parse_args(argv)
    salt = a.salt if a.salt else secrets.token_hex(6)
    if any(c not in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_." for c in salt):
        ap.error("salt may only contain [A-Za-z0-9._-]")
    if a.assets_url:
        p = generate_assets(a.outdir, salt, a.assets_url.rstrip("/"))
    else:
        p = generate(a.outdir, salt)
    print("generated %s: %d actions, ~%.1f MiB of outputs, salt %s"
          % (a.outdir, p.count, p.bytes / MiB, salt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
