"""Fuzz: mutated footers and TOCs of the reference layers never crash or hang the reader.

Hypothesis takes a layer the Go tools wrote and damages its end: byte flips in the footer
or the compressed TOC, truncation anywhere near the end, edits of the TOC JSON text, or
edits of TOC values (wrong types, huge or negative numbers, escaping names, dropped,
duplicated or swapped entries) re-assembled into a well-formed blob. Opening it and reading
some files must either work or raise a `stargz.errors.StargzError` subclass: never another
exception type, never a hang (hard timeout per test, deadline per example). Runs over both
backends of the native core. Bounded to ~40 s in all.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import tarfile

import pytest
import zstandard
from fuzzing import fuzz_settings, fuzz_timeout
from hypothesis import event, given
from hypothesis import strategies as st

from stargz.errors import StargzError
from stargz.estargz import Reader
from stargz.estargz.footer import gzip_footer, parse_footer, skippable_frame, zstd_footer_frame

pytestmark = pytest.mark.fuzz

BACKENDS = ["python"] if os.environ.get("STARGZ_NO_EXTENSIONS") == "1" else ["native", "python"]
# (layout, tag, layer index) of the layers to damage: gzip 4 MiB and 64 KiB chunks,
# zstd:chunked, a small layer, and one with a prefetch landmark
TARGETS = [
    ("oci-corners", "esgz", 0),
    ("oci-corners", "esgz", 1),
    ("oci-corners", "esgz-64k", 0),
    ("oci-corners", "zstdchunked", 0),
    ("oci-corners", "zstdchunked", 1),
    ("oci-busybox", "opt", 0),
]

KEYS = [
    "name",
    "type",
    "size",
    "modtime",
    "linkName",
    "mode",
    "uid",
    "gid",
    "userName",
    "offset",
    "devMajor",
    "devMinor",
    "xattrs",
    "digest",
    "chunkOffset",
    "chunkSize",
    "chunkDigest",
    "innerOffset",
]
VALUES = st.one_of(
    st.sampled_from([0, -1, 1, 511, 4096, 65536, (1 << 63) - 1, 1 << 63, -(1 << 63), 1 << 64]),
    st.integers(-(1 << 40), 1 << 40),
    st.sampled_from(
        ["", "../x", "/abs", "a/../../b", "bin", "etc/", "dir", "reg", "chunk", "hardlink"]
        + ["symlink", "sha256:" + "0" * 64, "sha256:zz", "\x00", "data/text.txt"]
    ),
    st.text(max_size=8),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(["user.a", "", "x"]), st.sampled_from(["", "YQ==", "!"])),
)


class Target:
    """A fixture layer split into payload and TOC, so its end can be rebuilt."""

    def __init__(self, layer) -> None:
        self.blob = layer.path.read_bytes()
        self.toc_digest = layer.toc_digest
        self.footer = f = parse_footer(self.blob[-64:], len(self.blob))
        if f.kind == "zstd":
            self.toc_start = f.toc_offset - 8
            ctoc = self.blob[f.toc_offset : f.toc_offset + f.toc_size]
            self.toc_json = zstandard.ZstdDecompressor().decompress(
                ctoc, max_output_size=f.toc_uncompressed_size
            )
        else:
            self.toc_start = f.toc_offset
            raw = gzip.decompress(self.blob[f.toc_offset : len(self.blob) - f.footer_size])
            with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
                self.toc_json = tf.extractfile("stargz.index.json").read()

    def with_toc(self, toc_json: bytes) -> tuple[int, bytes]:
        """(cut, tail): the blob is ``blob[:cut] + tail``, with a new TOC and footer."""
        n = self.toc_start
        if self.footer.kind == "zstd":
            ctoc = zstandard.ZstdCompressor(level=1).compress(toc_json)
            return n, skippable_frame(ctoc) + zstd_footer_frame(n + 8, len(ctoc), len(toc_json))
        info = tarfile.TarInfo("stargz.index.json")
        info.size = len(toc_json)
        tar = info.tobuf(tarfile.USTAR_FORMAT) + toc_json + bytes(-len(toc_json) % 512 + 1024)
        return n, gzip.compress(tar, 1) + gzip_footer(n)


@pytest.fixture(scope="module")
def targets(oci_layout):
    return [Target(oci_layout(layout).layers(tag)[i]) for layout, tag, i in TARGETS]


def _overlay(base: bytes, cut: int, tail: bytes, patches: dict[int, int] | None = None):
    """read_at over the virtual blob ``base[:cut] + tail`` (with single bytes of ``base``
    replaced by ``patches``) without copying ``base``."""
    mv = memoryview(base)
    patches = patches or {}

    def read_at(off: int, n: int) -> bytes:
        out = b""
        if off < cut:
            end = min(off + n, cut)
            out = bytes(mv[off:end])
            hits = [p for p in patches if off <= p < end]
            if hits:
                buf = bytearray(out)
                for p in hits:
                    buf[p - off] = patches[p]
                out = bytes(buf)
        if off + n > cut:
            lo = max(off - cut, 0)
            out += tail[lo : lo + n - len(out)]
        return out

    return read_at, cut + len(tail)


@st.composite
def mutations(draw, n_targets: int):
    """(target index, kind, params): what to damage and how."""
    t = draw(st.integers(0, n_targets - 1))
    kind = draw(
        st.sampled_from(
            ["flip", "truncate", "json-text", "json-value", "json-value", "chunk-value", "payload"]
        )
    )
    return t, kind, draw(st.integers(0, 2**32)), draw(st.integers(0, 7)) == 0  # digest check


def _mutate(target: Target, kind: str, rng: random.Random, data) -> tuple:
    blob = target.blob
    if kind == "flip":
        # bytes of the footer or the compressed TOC (and a few before it)
        lo = max(target.toc_start - 16, 0)
        tail = bytearray(blob[lo:])
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            pos = data.draw(
                st.one_of(
                    st.integers(len(tail) - 51, len(tail) - 1),  # the footer
                    st.integers(0, len(tail) - 1),
                ),
                label="pos",
            )
            tail[max(pos, 0)] ^= data.draw(st.integers(1, 255), label="xor")
        return lo, bytes(tail)
    if kind == "truncate":
        cut = data.draw(st.integers(max(target.toc_start - 64, 0), len(blob) - 1), label="cut")
        return cut, b""
    if kind == "json-text":
        text = bytearray(target.toc_json)
        for _ in range(data.draw(st.integers(1, 3), label="edits")):
            pos = rng.randrange(len(text))
            op = data.draw(st.sampled_from(["flip", "delete", "insert", "cut"]), label="op")
            if op == "flip":
                text[pos] ^= 1 << rng.randrange(8)
            elif op == "delete":
                del text[pos : pos + rng.randint(1, 8)]
            elif op == "insert":
                text[pos:pos] = data.draw(st.sampled_from([b'"', b",", b"}", b"-1", b"\\u0000"]))
            else:
                del text[pos:]
        return target.with_toc(bytes(text))
    if kind == "payload":
        # bytes inside compressed chunks: only the chunk's reads may fail, never the open
        patches = {}
        for _ in range(data.draw(st.integers(1, 3), label="flips")):
            pos = rng.randrange(target.toc_start)
            patches[pos] = blob[pos] ^ data.draw(st.integers(1, 255), label="xor")
        return len(blob), b"", patches
    toc = json.loads(target.toc_json)
    entries = toc["entries"]
    if kind == "chunk-value":
        # numbers of a data entry moved a little or a lot, so reads run on bad geometry
        data_entries = [e for e in entries if e["type"] in ("reg", "chunk") and e.get("size", 1)]
        for _ in range(data.draw(st.integers(1, 2), label="edits")):
            e = rng.choice(data_entries)
            key = data.draw(
                st.sampled_from(["offset", "innerOffset", "chunkSize", "chunkOffset", "size"])
            )
            old = e.get(key, 0)
            e[key] = data.draw(
                st.sampled_from(
                    [old + 1, old - 1, old * 2, old // 2, old + 4096, 0, -old, 1 << 40]
                ),
                label="value",
            )
        return target.with_toc(json.dumps(toc, indent="\t").encode())
    # json-value: structural edits that keep the document valid JSON
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        op = data.draw(st.sampled_from(["set", "set", "set", "del", "dup", "drop", "swap", "top"]))
        i = rng.randrange(len(entries))
        if op == "set":
            entries[i][data.draw(st.sampled_from(KEYS), label="key")] = data.draw(VALUES)
        elif op == "del":
            entries[i].pop(data.draw(st.sampled_from(KEYS), label="key"), None)
        elif op == "dup":
            entries.insert(rng.randrange(len(entries) + 1), dict(entries[i]))
        elif op == "drop" and len(entries) > 1:
            del entries[i]
        elif op == "swap":
            j = rng.randrange(len(entries))
            entries[i], entries[j] = entries[j], entries[i]
        elif op == "top":
            toc[data.draw(st.sampled_from(["version", "entries"]))] = data.draw(VALUES)
            break
    return target.with_toc(json.dumps(toc, indent="\t").encode())


def _exercise(
    target: Target, damage: tuple, rng: random.Random, digest: bool, keep_toc: bool = True
) -> str:
    """Open and read; return what happened (for statistics). Only StargzError may escape.
    (``keep_toc=False``: the daemon's open, the builder reading the JSON bytes itself.)"""
    read_at, size = _overlay(target.blob, *damage)
    try:
        r = Reader(
            read_at, size, toc_digest=target.toc_digest if digest else None, keep_toc=keep_toc
        )
    except StargzError as e:
        return "open: " + type(e).__name__
    files = [n for _, n in r.walk() if n.type == "reg"]
    rng.shuffle(files)
    for node in files[:4]:
        off = rng.randint(0, max(node.entry.size, 0))
        try:
            r.read(node.id, off, 8192)
            r.read(node.id, 0, 100)
        except StargzError as e:
            return "read: " + type(e).__name__
    return "ok"


@fuzz_timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
@fuzz_settings(800)
@given(m=mutations(len(TARGETS)), data=st.data())
def test_damaged_tail_raises_only_stargz_errors(targets, swap_backend, backend, m, data):
    t, kind, seed, digest = m
    with pytest.MonkeyPatch.context() as mp:
        swap_backend(mp, backend)
        rng = random.Random(seed)
        damage = _mutate(targets[t], kind, rng, data)
        keep_toc = data.draw(st.booleans(), label="keep_toc")
        outcome = _exercise(targets[t], damage, rng, digest, keep_toc)
    event(f"{kind} -> {outcome}")


def test_targets_are_intact(targets):
    """Control: undamaged, every target opens with its digest and reads."""
    for target in targets:
        read_at, size = _overlay(target.blob, len(target.blob), b"")
        r = Reader(read_at, size, toc_digest=target.toc_digest)
        assert _exercise(target, (len(target.blob), b""), random.Random(0), True) == "ok"
        cut, tail = target.with_toc(target.toc_json)
        r = Reader(*_overlay(target.blob, cut, tail), toc_digest=target.toc_digest)
        assert r.landmark is not None
