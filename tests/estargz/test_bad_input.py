"""Bad input: each defect gets its own typed error and a message naming it; nothing hangs.

Bad blobs are made from good ones: the writer builds a layer, then the helpers below take
it apart (payload, TOC JSON, footer), edit the TOC or the bytes, and put it back together
with a fresh TOC member and footer (`footer.gzip_footer`, `footer.zstd_footer_frame`), so
each test breaks exactly one thing. Every test has a hard timeout, so a hang fails.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import re
import struct
import subprocess
import sys
import tarfile
import zlib

import pytest
import zstandard
from conftest import make_tar

from stargz.errors import (
    ChunkError,
    DecompressionBombError,
    DigestMismatch,
    FooterError,
    StargzError,
    TOCError,
    UnsafePathError,
    VerificationError,
)
from stargz.estargz import Reader, build
from stargz.estargz.footer import (
    gzip_footer,
    legacy_footer,
    parse_footer,
    skippable_frame,
    zstd_footer_frame,
)

pytestmark = pytest.mark.timeout(60)


# --- making and re-making blobs ------------------------------------------------------------


SMALL = b"hello, world\n"
BIG = bytes(range(256)) * 64  # 16 KiB: 4 chunks of 4 KiB
DEFAULT_TAR = make_tar(
    ("dir", None, {"type": tarfile.DIRTYPE, "mode": 0o755}),
    ("dir/small", SMALL, {}),
    ("dir/big", BIG, {}),
    ("dir/link", None, {"type": tarfile.SYMTYPE, "linkname": "small"}),
    ("dir/hard", None, {"type": tarfile.LNKTYPE, "linkname": "dir/small"}),
    ("last", b"the end\n", {}),
)


def make_blob(tar: bytes = DEFAULT_TAR, **kw) -> bytes:
    kw.setdefault("chunk_size", 4096)
    kw.setdefault("level", 6)
    out = io.BytesIO()
    build(io.BytesIO(tar), out, **kw)
    return out.getvalue()


def open_blob(blob: bytes, **kw) -> Reader:
    """Open ``blob`` as the daemon does (``keep_toc=False``: the builder reads the TOC JSON
    bytes itself) and as the CLI does (json.loads, then the builder): both must raise the
    same error with the same message, or open the same layer. Returns the CLI's reader."""

    def read_at(off: int, n: int) -> bytes:
        return blob[off : off + n]

    try:
        lean = Reader(read_at, len(blob), keep_toc=False, **kw)
    except Exception as e:
        with pytest.raises(type(e)) as full_error:
            Reader(read_at, len(blob), **kw)
        assert str(full_error.value) == str(e)
        raise
    try:
        full = Reader(read_at, len(blob), **kw)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"keep_toc=False opened what keep_toc=True refuses: {e!r}")
    assert [_node_facts(n) for n in lean.nodes] == [_node_facts(n) for n in full.nodes]
    assert lean.dirents == full.dirents and lean.landmark == full.landmark
    assert (lean.chunk_comp, lean.chunk_digests) == (full.chunk_comp, full.chunk_digests)
    return full


def _node_facts(node) -> tuple:
    return (node.id, node.path, node.type, node.mode, node.size, node.nlink, node.attrs)


def toc_tar(toc_json: bytes, name: str = "stargz.index.json") -> bytes:
    """The TOC's tar: one entry, then the end-of-archive blocks (SPEC §1)."""
    info = tarfile.TarInfo(name)
    info.size = len(toc_json)
    return info.tobuf(tarfile.USTAR_FORMAT) + toc_json + bytes(-len(toc_json) % 512) + bytes(1024)


class Parts:
    """A blob taken apart: payload (everything before the TOC), TOC JSON, compression."""

    def __init__(self, blob: bytes) -> None:
        f = parse_footer(blob[-64:], len(blob))
        self.compression = f.compression
        self.payload = blob[: f.toc_offset - (8 if f.kind == "zstd" else 0)]
        if f.kind == "zstd":
            ctoc = blob[f.toc_offset : f.toc_offset + f.toc_size]
            self.toc_json = zstandard.ZstdDecompressor().decompress(
                ctoc, max_output_size=f.toc_uncompressed_size
            )
        else:
            raw = gzip.decompress(blob[f.toc_offset : len(blob) - f.footer_size])
            with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
                self.toc_json = tf.extractfile("stargz.index.json").read()
        self.toc = json.loads(self.toc_json)

    def entry(self, name: str, type_: str | None = None) -> dict:
        for e in self.toc["entries"]:
            if e["name"].rstrip("/") == name and (type_ is None or e["type"] == type_):
                return e
        raise KeyError(name)

    def assemble(self, toc_json: bytes | None = None, payload: bytes | None = None) -> bytes:
        """payload + TOC member/frame + footer; the TOC JSON defaults to ``self.toc``."""
        if toc_json is None:
            toc_json = dump(self.toc)
        payload = self.payload if payload is None else payload
        if self.compression == "zstd":
            ctoc = zstandard.ZstdCompressor().compress(toc_json)
            return (
                payload
                + skippable_frame(ctoc)
                + zstd_footer_frame(len(payload) + 8, len(ctoc), len(toc_json))
            )
        return payload + gzip.compress(toc_tar(toc_json)) + gzip_footer(len(payload))


def dump(toc: dict) -> bytes:
    return json.dumps(toc, indent="\t").encode()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["gzip", "zstd"])
def compression(request) -> str:
    return request.param


def test_helpers_round_trip(compression):
    """Taking a good blob apart and putting it back gives a blob that reads the same."""
    blob = make_blob(compression=compression)
    parts = Parts(blob)
    again = parts.assemble(parts.toc_json)
    r = open_blob(again, toc_digest=digest(parts.toc_json))
    assert r.read(r.lookup("dir/big").id, 0, 1 << 20) == BIG
    assert r.read(r.lookup("dir/hard").id, 0, 100) == SMALL


# --- footer and framing ---------------------------------------------------------------------


@pytest.mark.parametrize("cut", [1, 10, 40, 51, 52, 100, 0.5, 0.9, 0.99])
def test_truncated_blob(compression, cut):
    blob = make_blob(compression=compression)
    keep = int(len(blob) * cut) if isinstance(cut, float) else len(blob) - cut
    with pytest.raises(FooterError, match="no eStargz footer found"):
        open_blob(blob[:keep])


@pytest.mark.parametrize("keep", [0, 1, 20, 47])
def test_blob_shorter_than_any_footer(keep):
    blob = make_blob()[:keep]
    with pytest.raises((FooterError, TOCError), match="footer|empty"):
        open_blob(blob)


def test_source_shorter_than_declared_size(compression):
    """The source ends early (say, a truncated cache file): a short read, not garbage."""
    blob = make_blob(compression=compression)
    short = blob[: len(blob) - 100]
    with pytest.raises(ChunkError, match="short read"):
        Reader(lambda off, n: short[off : off + n], len(blob))


def test_truncated_inside_a_chunk(compression):
    """Footer and TOC intact, but the source ends inside a file's member."""
    blob = make_blob(compression=compression)
    r = open_blob(blob)
    node = r.lookup("dir/big")
    start, end = r.chunk_span(r.chunk_rows(node.id, 0, 1)[0])
    with pytest.raises(ChunkError, match="chunk is truncated|chunk is short"):
        r.decode_chunk(r.chunk_rows(node.id, 0, 1)[0], blob[start : start + (end - start) // 2])
    # through the Reader: the source loses its bytes after the reader was opened
    src = [blob]
    r2 = Reader(lambda off, n: src[0][off : off + n], len(blob))
    src[0] = blob[: start + (end - start) // 2]
    with pytest.raises(ChunkError, match="short read"):
        r2.read(node.id, 0, 10)


def test_wrong_footer_magic_lists_every_attempt():
    blob = bytearray(make_blob())
    blob[-51 + 32 : -51 + 38] = b"STARGX"
    with pytest.raises(FooterError) as ei:
        open_blob(bytes(blob))
    msg = str(ei.value)
    for variant in ("gzip:", "legacy:", "zstd:chunked:"):
        assert variant in msg, msg
    assert "STARGZ" in msg


def test_garbage_tail_lists_every_attempt():
    blob = make_blob() + b"\x00" * 64
    with pytest.raises(FooterError, match="gzip: invalid header.*legacy.*zstd:chunked"):
        open_blob(blob)


def test_footer_offset_not_hex():
    blob = bytearray(make_blob())
    blob[-51 + 16 : -51 + 32] = b"zzzzzzzzzzzzzzzz"
    with pytest.raises(FooterError, match="not 16 hex digits"):
        open_blob(bytes(blob))


def test_legacy_footer_is_read():
    """Control for the footer tests: the 47-byte CRFS footer opens the same TOC."""
    blob = make_blob()
    good = open_blob(blob)
    legacy = blob[:-51] + legacy_footer(good.footer.toc_offset)
    r = open_blob(legacy, toc_digest=good.toc_digest)
    assert r.footer.kind == "legacy"
    assert r.read(r.lookup("dir/big").id, 0, 1 << 20) == BIG


def test_toc_offset_past_the_end():
    blob = make_blob()
    bad = blob[:-51] + gzip_footer(len(blob) + 100)
    with pytest.raises(FooterError, match="past the end"):
        open_blob(bad)


def test_zstd_toc_offset_past_the_end():
    blob = make_blob(compression="zstd")
    f = open_blob(blob).footer
    bad = blob[:-48] + zstd_footer_frame(len(blob) + 8, f.toc_size, f.toc_uncompressed_size)
    with pytest.raises(FooterError, match="past the end"):
        open_blob(bad)
    bad = blob[:-48] + zstd_footer_frame(f.toc_offset, len(blob), f.toc_uncompressed_size)
    with pytest.raises(FooterError, match="runs past"):
        open_blob(bad)


def test_toc_offset_not_at_a_member():
    """The offset points into the payload: the TOC there is no gzip stream."""
    blob = make_blob()
    bad = blob[:-51] + gzip_footer(3)
    with pytest.raises(TOCError, match="TOC gzip stream|TOC tar"):
        open_blob(bad)


def test_toc_tar_entry_has_the_wrong_name():
    parts = Parts(make_blob())
    bad = parts.payload + gzip.compress(toc_tar(parts.toc_json, "other.json"))
    bad += gzip_footer(len(parts.payload))
    with pytest.raises(TOCError, match="expected 'stargz.index.json'"):
        open_blob(bad)


def test_toc_larger_than_limit(compression):
    blob = make_blob(compression=compression)
    with pytest.raises(TOCError, match="limit"):
        open_blob(blob, max_toc_size=100)


def test_zstd_toc_larger_than_the_footer_says():
    parts = Parts(make_blob(compression="zstd"))
    ctoc = zstandard.ZstdCompressor().compress(parts.toc_json)
    n = len(parts.payload)
    bad = parts.payload + skippable_frame(ctoc) + zstd_footer_frame(n + 8, len(ctoc), 10)
    with pytest.raises(TOCError, match="footer says 10"):
        open_blob(bad)


# --- TOC JSON -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toc_json", "message"),
    [
        (b"not json{", "not valid JSON"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b"[1, 2]", "must be an object"),
        (b'{"version": 2, "entries": []}', "unsupported TOC version 2"),
        (b'{"version": "1", "entries": []}', "version must be an integer"),
        (b'{"version": 1, "entries": {}}', "'entries' must be an array"),
        (b'{"version": 1, "entries": [1]}', "entry 0 is not a JSON object"),
        (b'{"version": 1, "entries": [{"type": "reg"}]}', "has no name"),
        (b'{"version": 1, "entries": [{"name": "a", "type": "weird"}]}', "unknown type 'weird'"),
        (b'{"version": 1, "entries": [{"name": "a", "type": "reg", "size": "1"}]}', "64-bit"),
        (b'{"version": 1, "entries": [{"name": "a", "type": "dir", "mode": 1.5}]}', "64-bit"),
        (b'{"version": 1, "entries": [{"name": 7, "type": "dir"}]}', "must be a string"),
        (
            b'{"version": 1, "entries": [{"name": "a", "type": "reg", "xattrs": {"k": "!!"}}]}',
            "not valid base64",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "JSON"),
    ],
    ids=lambda v: v[:30].decode("latin-1") if isinstance(v, bytes) else v,
)
def test_toc_that_is_not_a_valid_document(compression, toc_json, message):
    parts = Parts(make_blob(compression=compression))
    with pytest.raises(TOCError, match=message):
        open_blob(parts.assemble(toc_json), toc_digest=digest(toc_json))


def test_unknown_keys_are_ignored(compression):
    """Control: NumLink and other unknown keys are fine (Go ignores them too)."""
    parts = Parts(make_blob(compression=compression))
    for e in parts.toc["entries"]:
        e["NumLink"] = 0
        e["somethingNew"] = {"x": [1]}
    r = open_blob(parts.assemble())
    assert r.read(r.lookup("dir/big").id, 0, 1 << 20) == BIG


# --- names that escape the layer ------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "/abs", "a/../../b", "dir/../../etc/passwd", "a\x00b"])
def test_entry_name_escapes_the_layer(compression, name):
    parts = Parts(make_blob(compression=compression))
    parts.entry("last")["name"] = name
    with pytest.raises(UnsafePathError) as ei:
        open_blob(parts.assemble())
    assert repr(name) in str(ei.value)


@pytest.mark.parametrize("target", ["../../etc/passwd", "/etc/passwd", "dir/../../x"])
def test_hardlink_target_escapes_the_layer(compression, target):
    parts = Parts(make_blob(compression=compression))
    parts.entry("dir/hard")["linkName"] = target
    with pytest.raises(UnsafePathError) as ei:
        open_blob(parts.assemble())
    assert repr(target) in str(ei.value)


def test_hardlink_to_a_missing_target(compression):
    parts = Parts(make_blob(compression=compression))
    parts.entry("dir/hard")["linkName"] = "dir/nope"
    with pytest.raises(TOCError, match="'dir/nope' is not in the layer"):
        open_blob(parts.assemble())


def test_hardlink_to_a_directory(compression):
    parts = Parts(make_blob(compression=compression))
    parts.entry("dir/hard")["linkName"] = "dir"
    with pytest.raises(TOCError, match="is a directory"):
        open_blob(parts.assemble())


def test_file_under_a_symlinked_parent(compression):
    """``dir/link`` is a symlink; an entry below it would be written through it."""
    parts = Parts(make_blob(compression=compression))
    parts.entry("last")["name"] = "dir/link/passwd"
    with pytest.raises(TOCError, match="parent 'dir/link' is a symlink, not a directory"):
        open_blob(parts.assemble())


def test_chunk_entry_with_an_escaping_name():
    parts = Parts(make_blob())
    chunks = [e for e in parts.toc["entries"] if e["type"] == "chunk"]
    chunks[0]["name"] = "../dir/big"
    with pytest.raises(UnsafePathError, match="'..'"):
        open_blob(parts.assemble())


def test_chunk_that_does_not_follow_its_file():
    parts = Parts(make_blob())
    chunks = [e for e in parts.toc["entries"] if e["type"] == "chunk"]
    chunks[0]["name"] = "dir/small"
    with pytest.raises(TOCError, match="chunk does not follow its file"):
        open_blob(parts.assemble())


# --- chunk offsets --------------------------------------------------------------------------


def _data_entries(parts: Parts, name: str) -> list[dict]:
    out = []
    for e in parts.toc["entries"]:
        if e["name"].rstrip("/") == name and e["type"] in ("reg", "chunk"):
            out.append(e)
    return out


@pytest.mark.parametrize("where", ["past the payload", "negative", "huge"])
def test_chunk_offset_out_of_range(compression, where):
    parts = Parts(make_blob(compression=compression))
    e = _data_entries(parts, "last")[0]
    e["offset"] = {
        "past the payload": len(parts.payload) + 10,
        "negative": -1,
        "huge": (1 << 63) - 1,
    }[where]
    with pytest.raises(ChunkError, match="outside the blob payload"):
        open_blob(parts.assemble())


def test_negative_inner_offset(compression):
    parts = Parts(make_blob(compression=compression))
    _data_entries(parts, "last")[0]["innerOffset"] = -5
    with pytest.raises(ChunkError, match="outside the blob payload|negative"):
        open_blob(parts.assemble())


def test_compressed_offsets_overlap(compression):
    """A later file's member starts before an earlier file's chunk."""
    parts = Parts(make_blob(compression=compression))
    big = _data_entries(parts, "dir/big")
    _data_entries(parts, "last")[0]["offset"] = big[1]["offset"]
    with pytest.raises(ChunkError, match="overlaps the previous chunk"):
        open_blob(parts.assemble())


def test_chunk_offsets_within_a_file_overlap(compression):
    parts = Parts(make_blob(compression=compression))
    big = _data_entries(parts, "dir/big")
    big[2]["chunkOffset"] = big[1]["chunkOffset"]
    with pytest.raises(ChunkError, match="gap or overlaps"):
        open_blob(parts.assemble())


def test_chunks_leave_a_gap(compression):
    parts = Parts(make_blob(compression=compression))
    big = _data_entries(parts, "dir/big")
    parts.toc["entries"].remove(big[1])
    with pytest.raises(ChunkError, match="gap or overlaps"):
        open_blob(parts.assemble())


def test_chunks_do_not_cover_the_file(compression):
    parts = Parts(make_blob(compression=compression))
    big = _data_entries(parts, "dir/big")
    parts.toc["entries"].remove(big[-1])
    with pytest.raises(ChunkError, match="chunks cover 12288 of 16384 bytes"):
        open_blob(parts.assemble())


def test_chunk_larger_than_its_file(compression):
    parts = Parts(make_blob(compression=compression))
    e = _data_entries(parts, "last")[0]
    e["chunkSize"] = e["size"] + 1
    with pytest.raises(ChunkError, match="outside the file"):
        open_blob(parts.assemble())


def test_negative_file_size(compression):
    parts = Parts(make_blob(compression=compression))
    _data_entries(parts, "last")[0]["size"] = -3
    with pytest.raises(TOCError, match="negative size"):
        open_blob(parts.assemble())


def test_chunk_larger_than_the_decode_limit(compression):
    blob = make_blob(compression=compression)
    with pytest.raises(ChunkError, match="exceeds the limit"):
        open_blob(blob, max_chunk_size=1000)


# --- decompression bombs --------------------------------------------------------------------

BOMB = 256 << 20  # what the member really inflates to
DECLARED = 4096  # what the TOC says the chunk is


def _gzip_zeros(n_mib: int) -> bytes:
    """A gzip member of ``n_mib`` MiB of zeros, made in ~0.1 s: one full-flushed deflate
    block sequence (no back references across it) repeated."""
    mib = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(mib) + c.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(n_mib):
        crc = zlib.crc32(mib, crc)
    head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return head + block * n_mib + c.flush() + struct.pack("<II", crc, (n_mib << 20) & 0xFFFFFFFF)


def _zstd_zeros(n_mib: int) -> bytes:
    c = zstandard.ZstdCompressor(level=3).compressobj()
    mib = bytes(1 << 20)
    return b"".join(c.compress(mib) for _ in range(n_mib)) + c.flush()


def make_bomb(compression: str) -> tuple[bytes, str]:
    """A layer whose last file declares 4 KiB of zeros, in a member of 256 MiB of zeros."""
    tar = make_tar(("ok", SMALL, {}), ("bomb", bytes(DECLARED), {}))
    parts = Parts(make_blob(tar, compression=compression))
    e = _data_entries(parts, "bomb")[0]
    assert e["size"] == DECLARED
    member = _gzip_zeros(BOMB >> 20) if compression == "gzip" else _zstd_zeros(BOMB >> 20)
    payload = parts.payload[: e["offset"]] + member
    toc_json = dump(parts.toc)
    return parts.assemble(toc_json, payload), digest(toc_json)


_BOMB_PROBE = r"""
import json, resource, sys, time
from stargz.estargz import open_file
path, toc_digest = sys.argv[1], sys.argv[2]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.monotonic()
out = {}
with open_file(path, toc_digest=toc_digest) as r:
    from stargz.estargz import codec
    out["backend"] = codec.backend
    out["ok"] = r.read(r.lookup("ok").id, 0, 100).decode()
    try:
        data = r.read(r.lookup("bomb").id, 0, 1 << 30)
        out["result"] = ["returned", len(data)]
    except Exception as e:
        out["result"] = [type(e).__name__, str(e)]
out["seconds"] = time.monotonic() - t
out["rss_growth_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps(out))
"""


@pytest.mark.parametrize(
    "backend", ["python"] if os.environ.get("STARGZ_NO_EXTENSIONS") == "1" else ["native", "python"]
)
def test_decompression_bomb_fails_fast_in_bounded_memory(compression, backend, tmp_path):
    """Run in a fresh interpreter so ru_maxrss measures this read alone."""
    blob, toc_digest = make_bomb(compression)
    assert len(blob) < 2 << 20
    path = tmp_path / "bomb.blob"
    path.write_bytes(blob)
    env = {"STARGZ_NO_EXTENSIONS": "1" if backend == "python" else "0"}
    proc = subprocess.run(
        [sys.executable, "-c", _BOMB_PROBE, str(path), toc_digest],
        capture_output=True,
        text=True,
        timeout=50,
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["backend"] == backend
    assert out["ok"] == SMALL.decode()
    kind, message = out["result"]
    assert kind == DecompressionBombError.__name__, out
    assert "inflates past its declared size" in message
    assert out["rss_growth_kib"] < 64 << 10, out  # far below the 256 MiB it would take
    assert out["seconds"] < 10, out


def test_decompression_bomb_in_process(compression):
    blob, toc_digest = make_bomb(compression)
    r = open_blob(blob, toc_digest=toc_digest)
    with pytest.raises(DecompressionBombError, match="inflates past its declared size"):
        r.read(r.lookup("bomb").id, 0, DECLARED)
    assert r.read(r.lookup("ok").id, 0, 100) == SMALL


def test_many_headers_after_a_file_are_not_a_bomb():
    """Control: 12k empty files with long (PAX) names after a file put ~18 MiB of tar
    headers in the member of the file's last chunk, more than the codec's fixed allowance;
    the reader must allow for the entries the TOC lists there and read the file."""
    long = "n" * 150
    members = [("file", b"x" * 100, {})] + [(f"e/{k:05d}{long}", b"", {}) for k in range(12_000)]
    blob = make_blob(make_tar(*members), level=1)
    r = open_blob(blob)
    assert r.read(r.lookup("file").id, 0, 1000) == b"x" * 100


@pytest.mark.parametrize("value", [(1 << 63) - 1, 1 << 62, 1 << 40])
def test_huge_inner_offset(compression, value):
    parts = Parts(make_blob(compression=compression))
    _data_entries(parts, "last")[0]["innerOffset"] = value
    r = open_blob(parts.assemble())
    with pytest.raises(ChunkError, match="chunk is short|outside"):
        r.read(r.lookup("last").id, 0, 100)


# --- digests --------------------------------------------------------------------------------


def test_wrong_toc_digest(compression):
    blob = make_blob(compression=compression)
    wrong = "sha256:" + "0" * 64
    with pytest.raises(DigestMismatch, match="TOC digest mismatch") as ei:
        open_blob(blob, toc_digest=wrong)
    assert wrong in str(ei.value)


def test_edited_toc_fails_the_original_digest(compression):
    """Editing the TOC (here: one mode bit) is caught by the annotation's digest."""
    blob = make_blob(compression=compression)
    good = open_blob(blob).toc_digest
    parts = Parts(blob)
    parts.entry("last")["mode"] = 0o4755
    with pytest.raises(DigestMismatch, match="TOC digest mismatch"):
        open_blob(parts.assemble(), toc_digest=good)


def _flip_in_chunk(blob: bytes, reader: Reader, path: str, chunk_index: int) -> bytes:
    node = reader.lookup(path)
    rows = reader.chunk_rows(node.id, 0, node.entry.size)
    start, end = reader.chunk_span(rows[chunk_index])
    pos = start + (end - start) // 2
    out = bytearray(blob)
    out[pos] ^= 0x55
    return bytes(out)


@pytest.mark.parametrize(
    ("compression", "level", "data"),
    [
        ("gzip", 6, "random"),  # zlib keeps incompressible data in stored blocks
        ("gzip", 9, "pattern"),
        ("gzip", 1, "pattern"),  # ISA-L
        ("zstd", 19, "pattern"),
        ("zstd", 3, "random"),
    ],
)
def test_flipped_byte_inside_a_chunk(compression, level, data):
    """Only the damaged chunk fails; the file's other chunks and other files still read."""
    content = BIG if data == "pattern" else random.Random(7).randbytes(len(BIG))
    tar = make_tar(("dir/small", SMALL, {}), ("dir/big", content, {}), ("last", b"end", {}))
    blob = make_blob(tar, compression=compression, level=level)
    r = open_blob(blob)
    bad = _flip_in_chunk(blob, r, "dir/big", 1)
    r = open_blob(bad, toc_digest=r.toc_digest)  # the TOC itself is intact
    big = r.lookup("dir/big").id
    for off, size in ((4096, 10), (0, len(content)), (8000, 200)):
        with pytest.raises((DigestMismatch, ChunkError)) as ei:
            r.read(big, off, size)
        assert re.search(r"sha256 mismatch|corrupt|incorrect|truncated|short", str(ei.value))
    assert r.read(big, 0, 4096) == content[:4096]
    assert r.read(big, 8192, 8192) == content[8192:]
    assert r.read(r.lookup("dir/small").id, 0, 100) == SMALL
    assert r.read(r.lookup("last").id, 0, 100) == b"end"


def test_wrong_chunk_digest_in_toc(compression):
    parts = Parts(make_blob(compression=compression))
    e = _data_entries(parts, "last")[0]
    e["chunkDigest"] = digest(b"something else")
    r = open_blob(parts.assemble())
    with pytest.raises(DigestMismatch, match="sha256 mismatch"):
        r.read(r.lookup("last").id, 0, 100)
    assert r.read(r.lookup("dir/small").id, 0, 100) == SMALL


def test_missing_chunk_digest_needs_verify_off(compression):
    parts = Parts(make_blob(compression=compression))
    del _data_entries(parts, "last")[0]["chunkDigest"]
    blob = parts.assemble()
    with pytest.raises(VerificationError, match="no chunkDigest"):
        open_blob(blob)
    r = open_blob(blob, verify=False)
    assert r.read(r.lookup("last").id, 0, 100) == b"the end\n"


@pytest.mark.parametrize("value", ["sha256:xyz", "md5:" + "0" * 32, "sha256:" + "A" * 64])
def test_malformed_chunk_digest(compression, value):
    parts = Parts(make_blob(compression=compression))
    _data_entries(parts, "last")[0]["chunkDigest"] = value
    with pytest.raises(TOCError, match="not a sha256 digest"):
        open_blob(parts.assemble())


# --- every error above is a StargzError --------------------------------------------------------


def test_error_kinds_form_one_family():
    for kind in (
        FooterError,
        TOCError,
        UnsafePathError,
        ChunkError,
        DecompressionBombError,
        DigestMismatch,
        VerificationError,
    ):
        assert issubclass(kind, StargzError)
    assert issubclass(UnsafePathError, TOCError)
    assert issubclass(DecompressionBombError, ChunkError)
    assert issubclass(DigestMismatch, VerificationError)


# --- duplicate names: the later entry wins, as when tar extracts ----------------------------


def test_later_entry_replaces_an_earlier_one(compression):
    """An empty file, then the same name with content: the content wins and reads back."""
    parts = Parts(make_blob(compression=compression))
    last = parts.entry("last")
    empty = {k: v for k, v in parts.entry("dir/small").items() if k in ("type", "mode")}
    empty.update(name="last", digest=digest(b""))
    entries = parts.toc["entries"]
    entries.insert(entries.index(last) - 1, empty)
    r = open_blob(parts.assemble())
    node = r.lookup("last")
    assert r.read(node.id, 0, 100) == b"the end\n"
    assert [p for p, _ in r.walk()].count("last") == 1


def test_directory_replaced_by_a_file_is_refused(compression):
    parts = Parts(make_blob(compression=compression))
    parts.toc["entries"].append({"name": "dir", "type": "symlink", "linkName": "x"})
    with pytest.raises(TOCError, match="replaces a dir with a symlink"):
        open_blob(parts.assemble())
