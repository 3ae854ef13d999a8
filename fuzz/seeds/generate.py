#!/usr/bin/env python3
"""Regenerates the committed seed inputs of the fuzz targets (a few hundred bytes each).

Records follow storage-engine/src/format.rs (`Header::encode`): a 72-byte header whose CRC32 covers the
8-byte little-endian nonce followed by header bytes 0..68, then the payload, whose
CRC32 is stored at header bytes 64..68. zlib.crc32 is the same CRC-32 as crc32fast.
Input layouts are described at the top of each target in fuzz_targets/.
"""
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
NONCE = 0x0123_4567_89AB_CDEF
MAGIC = b"CRNR"


def record(seq, kind, function, hash_byte, payload, nonce=NONCE):
    head = MAGIC + bytes([1, kind, function, 0]) + struct.pack("<Q", seq)
    head += bytes([hash_byte]) * 32 + struct.pack("<QQI", len(payload), len(payload),
                                                  zlib.crc32(payload))
    crc = zlib.crc32(struct.pack("<Q", nonce) + head)
    return head + struct.pack("<I", crc) + payload


def record_input(image, start=0, mode=0, nonce=NONCE):
    return struct.pack("<QIB", nonce, start, mode) + image


def zstd_rle_frame(byte, blocks, content_size=False):
    """A zstd frame of `blocks` RLE blocks of 128 KiB each, built by hand (RFC 8878):
    a few dozen bytes that decode to `blocks` x 128 KiB, the shape of a highly
    compressible upload."""
    block = 128 * 1024
    frame = struct.pack("<I", 0xFD2FB528)
    # Frame header descriptor: optional 4-byte content size, no checksum, no
    # dictionary; then the window descriptor (2^(10+10) = 1 MiB).
    frame += bytes([0x80 if content_size else 0x00, 10 << 3])
    if content_size:
        frame += struct.pack("<I", block * blocks)
    for i in range(blocks):
        last = 1 if i == blocks - 1 else 0
        header = last | (1 << 1) | (block << 3)  # Block_Type 1: RLE
        frame += struct.pack("<I", header)[:3] + bytes([byte])
    return frame


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def main():
    recs = [record(i, 1 + i % 2, 1 + (i // 2) % 2, i, bytes([i]) * (i * 7)) for i in range(4)]
    packed = b"".join(recs)
    write("record_decode", "packed", record_input(packed))
    write("record_decode", "zeros-then-record", record_input(bytes(100) + recs[1] + bytes(40)))
    damaged = bytearray(packed)
    damaged[len(recs[0]) + 20] ^= 1  # header of the second record
    damaged[len(recs[0]) + len(recs[1]) + len(recs[2]) - 1] ^= 1  # payload of the third
    write("record_decode", "damaged", record_input(bytes(damaged)))
    write("record_decode", "torn-tail", record_input(packed[:-5]))
    write("record_decode", "start-mid", record_input(packed, start=len(recs[0]) + 3))
    stale = bytearray(record(9, 1, 2, 9, b"abc"))
    stale[64:72] = bytes(8)  # both CRCs wrong: only mode 1 (repair) makes it decode
    write("record_decode", "repair-mode", record_input(bytes(stale), mode=1))

    # zstd_stream: mode byte, two piece sizes, data (fuzz_targets/zstd_stream.rs).
    write("zstd_stream", "rle-1mib-one-piece", bytes([0, 255, 255]) + zstd_rle_frame(0x41, 8))
    write("zstd_stream", "rle-1mib-bytewise", bytes([0, 1, 1]) + zstd_rle_frame(0x20, 8, True))
    write("zstd_stream", "two-frames", bytes([2, 3, 7]) + zstd_rle_frame(1, 2) + zstd_rle_frame(2, 3, True))
    write("zstd_stream", "empty-stream", bytes([0, 5, 5]))
    write("zstd_stream", "truncated", bytes([0, 5, 5]) + zstd_rle_frame(9, 4)[:-2])
    text = b"The quick brown fox jumps over the lazy dog while the build cache answers. "
    write("zstd_stream", "text-repeated", bytes([0x3b, 255, 255]) + text)
    write("zstd_stream", "text-checksum-bytewise", bytes([0x15, 1, 2]) + text * 3)
    # A zstd v0.5 frame (magic 0xFD2FB525), which the reference decoder reads and the
    # stream decoder refuses by design: found by the fuzzer.
    write("zstd_stream", "legacy-v05-frame", bytes([40, 0, 255, 37, 181, 47, 253, 0, 245, 82, 63]))

    # checkpoint_decode: nonce, mode, file image (fuzz_targets/checkpoint_decode.rs).
    write("checkpoint_decode", "preamble-fixed",
          struct.pack("<QB", NONCE, 1) + bytes(16) + bytes(range(64)))
    write("checkpoint_decode", "raw-magic", struct.pack("<QB", NONCE, 0) + b"CRNCKPT1" + bytes(40))
    write("checkpoint_decode", "described-damaged",
          struct.pack("<QB", NONCE, 3) + bytes([40, 0, 0xFF]) + bytes(range(1, 62)))
    write("checkpoint_decode", "described-intact",
          struct.pack("<QB", NONCE, 2) + bytes([7, 0]) + bytes(range(30)))

    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    write("digest_parse", "sha256-empty", bytes([0]) + struct.pack("<Q", 0) + empty.encode())
    write("digest_parse", "blake3-upper",
          bytes([1]) + struct.pack("<Q", 3) + empty.upper().encode())
    write("digest_parse", "short", bytes([0]) + struct.pack("<Q", 1) + b"abc")
    write("digest_parse", "non-hex", bytes([0]) + struct.pack("<Q", 1) + b"g" * 64)
    write("digest_parse", "multibyte", bytes([1]) + struct.pack("<Q", 1) + ("\u00e9" * 32).encode())

    # input_plan: directory count, then operations (fuzz_targets/input_plan.rs). Name
    # bytes below 0x80 pick from its NAMES: 0 "a", 1 "b", 2 "c", 3 "d", 4 "..", 10 "../x".
    nxt, f, d, s, raw = 0, 1, 2, 3, 4
    write("input_plan", "valid-tree",
          bytes([1, f, 0, 1, d, 3, 1, s, 1, 0, nxt, f, 1, 0, s, 2, 10]))
    write("input_plan", "file-named-dotdot", bytes([0, f, 0, 0, f, 4, 0]))
    write("input_plan", "contains-itself", bytes([0, f, 1, 0, d, 0, 0]))
    write("input_plan", "missing-subdirectory", bytes([0, d, 0, 1]))
    fanout = [3]
    for i in range(3):
        fanout += [d, 0, i + 1, d, 1, i + 1, nxt]
    write("input_plan", "shared-subdirectories", bytes(fanout + [f, 2, 1]))
    digest = b"\x0a\x40" + b"f" * 64 + b"\x10\x03"
    file_node = b"\x0a\x01p\x12" + bytes([len(digest)]) + digest
    directory = b"\x0a" + bytes([len(file_node)]) + file_node
    write("input_plan", "decoded-directory", bytes([0, raw, len(directory)]) + directory)
    write("input_plan", "symlink-escaping-from-below",
          bytes([1, d, 3, 1, nxt, s, 0, 0x85, 2, 2, 3, 2, 2]))  # "../.." in d

    token = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    bcrypt = "$2y$05$c4WoMPo3SXsafkva.HHa6uXQZWr7oboPiC2bT/r7q1BB8I2s0BRqC"
    write("auth_file", "documented", (
        "{\n  principals: [\n"
        f"    {{ name: 'ci', token_sha256: '{token}', permissions: ['read', 'write', 'write_ac'] }},\n"
        f"    {{ name: 'alice', basic: {{ user: 'alice', hash: '{bcrypt}' }}, permissions: ['read'] }},\n"
        "    { name: 'builder', cert: 'ci-client', permissions: ['execute'], instances: ['main/'] },\n"
        "  ],\n  anonymous: { permissions: ['read'] }, // optional\n}\n").encode())
    write("auth_file", "bad-permission", b"{ principals: [ { name: 'x', cert: 'c', permissions: ['raed'] } ] }")
    write("auth_file", "same-token-twice", (
        f"{{ principals: [ {{ name: 'a', token_sha256: '{token}', permissions: [] }}, "
        f"{{ name: 'b', token_sha256: '{token.upper()}', permissions: [] }} ] }}").encode())
    write("auth_file", "truncated", b"{ principals: [ { name: 'x', basic: { user: ")
    write("auth_header", "bearer", b"Bearer abc.DEF-123_~+/=")
    write("auth_header", "basic", b"Basic YWxpY2U6czNjcjpldA==")
    write("auth_header", "basic-no-colon", b"basic aHVudGVyMg==")
    write("auth_header", "unknown-scheme", b"Digest username=x")
    write("auth_header", "tabs-and-case", b"\tBEARER\t\ttok ")
    write("sri", "bazel-sha256", b"sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=")
    write("sri", "several-with-options",
          b"sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU= "
          b"sha384-OLBgp1GsljhM2TJ+sbHjaiH9txEUvgdDTAzHv2P24donTt6/529l+9Ua0vFImLlb?ct=x md5-abc")
    write("sri", "short-hash", b"sha512-AAAA")


if __name__ == "__main__":
    main()
