"""Chunk decode: the native backend and its pure-Python twin, against ground truth.

Every test runs over both backends. A missing native module is a failure (CI always builds
it), unless ``STARGZ_NO_EXTENSIONS=1`` says the twin is all there is.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import pytest
import zstandard
from conftest import NO_EXTENSIONS, backend_of, backends_of
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from stargz.errors import ChunkError, DecompressionBombError, DigestMismatch
from stargz.estargz import codec

REPO = Path(__file__).resolve().parent.parent


def _backend(name: str) -> ModuleType:
    return backend_of(codec, name)


@pytest.fixture(params=["native", "python"])
def impl(request) -> ModuleType:
    return _backend(request.param)


@pytest.fixture(scope="module")
def both() -> list[ModuleType]:
    return backends_of(codec)


def test_selector() -> None:
    if NO_EXTENSIONS:
        assert codec.backend == "python" and codec.native is None
    else:
        assert codec.native is not None, codec.native_error
        assert codec.backend == "native"
        assert codec.decode_chunk is codec.native.decode_chunk
    assert codec.python.COMPRESSIONS == ("gzip", "zstd")


# --- helpers -------------------------------------------------------------------------


def gzip_member(data: bytes, level: int = 9, **header) -> bytes:
    """A gzip member with optional FEXTRA/FNAME/FCOMMENT/FHCRC, as Go or others write it."""
    flags = 0
    extra, name, comment = (
        header.get("extra", b""),
        header.get("name", b""),
        header.get("comment", b""),
    )
    flags |= 4 if extra else 0
    flags |= 8 if name else 0
    flags |= 16 if comment else 0
    flags |= 2 if header.get("hcrc") else 0
    h = bytearray(
        b"\x1f\x8b\x08" + bytes([flags]) + b"\0\0\0\0" + bytes([2 if level == 9 else 0, 255])
    )
    if extra:
        h += struct.pack("<H", len(extra)) + extra
    if name:
        h += name + b"\0"
    if comment:
        h += comment + b"\0"
    if header.get("hcrc"):
        h += struct.pack("<H", zlib.crc32(bytes(h)) & 0xFFFF)
    co = zlib.compressobj(level, zlib.DEFLATED, -15)
    body = co.compress(data) + co.flush()
    return bytes(h) + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


def zstd_frame(
    data: bytes, level: int = 3, checksum: bool = True, content_size: bool = True
) -> bytes:
    c = zstandard.ZstdCompressor(
        level=level, write_checksum=checksum, write_content_size=content_size
    )
    if content_size:
        return c.compress(data)
    out = io.BytesIO()
    with c.stream_writer(out, closefd=False) as w:  # streaming: no content size, as Go writes
        w.write(data)
    return out.getvalue()


def compress(compression: str, data: bytes, level: int) -> bytes:
    return gzip_member(data, level) if compression == "gzip" else zstd_frame(data, level)


def sha(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def outcome(fn, *args, **kwargs):
    """(exception class, None) or (None, result): for comparing the two backends."""
    try:
        return None, fn(*args, **kwargs)
    except (ChunkError, DigestMismatch) as e:
        return type(e), None


# --- real layers made by the Go tools ------------------------------------------------


def read_toc(blob: bytes) -> tuple[str, dict, int]:
    """(compression, TOC JSON, TOC offset) from the footer, parsed here independently."""
    if blob[:2] == b"\x1f\x8b":
        footer = blob[-51:]
        assert footer[32:38] == b"STARGZ", footer
        toc_off = int(footer[16:32], 16)
        raw = zlib.decompressobj(31).decompress(blob[toc_off:])
        with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
            member = tf.next()
            assert member is not None and member.name == "stargz.index.json"
            data = tf.extractfile(member).read()  # type: ignore[union-attr]
        return "gzip", json.loads(data), toc_off
    footer = blob[-40:]
    assert footer[32:] == b"GnUlInUx"
    toc_off, clen, ulen, kind = struct.unpack("<4Q", footer[:32])
    assert kind == 1
    data = zstandard.ZstdDecompressor().decompress(
        blob[toc_off : toc_off + clen], max_output_size=ulen
    )
    return "zstd", json.loads(data), toc_off


def toc_chunks(toc: dict) -> list[dict]:
    """reg/chunk entries with content, with their chunk size filled in (0 = to end)."""
    out, size = [], 0
    for e in toc["entries"]:
        if e["type"] == "reg":
            size = e.get("size", 0)
        if e["type"] not in ("reg", "chunk") or (e["type"] == "reg" and size == 0):
            continue
        e = dict(e)
        e["chunkSize"] = e.get("chunkSize") or size - e.get("chunkOffset", 0)
        e["fileSize"] = size
        out.append(e)
    return out


LAYERS = [
    ("oci-corners", "esgz"),
    ("oci-corners", "esgz-64k"),
    ("oci-corners", "zstdchunked"),
    ("oci-busybox", "esgz"),
    ("oci-busybox", "opt"),
]


@pytest.mark.parametrize(("layout", "tag"), LAYERS)
def test_every_chunk_of_real_layers(impl, oci_layout, layout: str, tag: str) -> None:
    n = 0
    for layer in oci_layout(layout).layers(tag):
        blob = layer.path.read_bytes()
        compression, toc, toc_off = read_toc(blob)
        chunks = toc_chunks(toc)
        offsets = sorted({e["offset"] for e in chunks} | {toc_off})
        ends = {o: offsets[i + 1] for i, o in enumerate(offsets[:-1])}
        shared = {o for o in offsets if sum(e["offset"] == o for e in chunks) > 1}
        files: dict[str, list[bytes]] = {}
        for e in chunks:
            off, inner, size = e["offset"], e.get("innerOffset", 0), e["chunkSize"]
            want = bytes.fromhex(e["chunkDigest"].removeprefix("sha256:"))
            exclusive = off not in shared
            # exactly the member, as the reader fetches it ...
            got = impl.decode_chunk(
                blob[off : ends[off]], compression, inner, size, want, exclusive
            )
            assert len(got) == size and sha(got) == want
            # ... or with the rest of the blob after it (must be ignored)
            mv = memoryview(blob)[off:]
            assert impl.decode_chunk(mv, compression, inner, size, want, exclusive) == got
            # the strict reading of "exclusive" fails on real layers: members carry the tar
            # padding and following headers (see _codec_py's docstring)
            files.setdefault(e["name"], []).append(got)
            n += 1
        for e in toc["entries"]:
            if e["type"] == "reg" and e.get("size") and e.get("digest"):
                content = b"".join(files[e["name"]])
                assert "sha256:" + hashlib.sha256(content).hexdigest() == e["digest"], e["name"]
    assert n > 0


def test_real_members_have_tails(impl, corners) -> None:
    """Why max_trailing exists: a Go-written member holds more than its chunk."""
    layer = corners.layers("esgz")[0]
    blob = layer.path.read_bytes()
    compression, toc, _ = read_toc(blob)
    e = next(e for e in toc_chunks(toc) if e["name"] == "etc/greeting")
    src = blob[e["offset"] :]
    impl.decode_chunk(src, compression, 0, e["chunkSize"], None, True)
    with pytest.raises(DecompressionBombError, match="chunk inflates past its declared size 21"):
        impl.decode_chunk(src, compression, 0, e["chunkSize"], None, True, max_trailing=0)


def test_footer_member_with_extra_field(impl, corners) -> None:
    blob = corners.layers("esgz")[0].path.read_bytes()
    assert impl.decode_chunk(blob[-51:], "gzip", 0, 0, sha(b""), True, max_trailing=0) == b""


# --- gzip header variants, trailer checks ---------------------------------------------

DATA = bytes(range(256)) * 40 + b"tail" * 5000


@pytest.mark.parametrize(
    "header",
    [
        {},
        {"extra": b"SG\x16\x00" + b"0" * 16 + b"STARGZ"},
        {"name": b"file.tar"},
        {"comment": b"a comment"},
        {"hcrc": True},
        {"extra": b"ab\x02\x00xy", "name": b"n", "comment": b"c", "hcrc": True},
    ],
)
@pytest.mark.parametrize("exclusive", [True, False])
def test_gzip_header_fields(impl, header, exclusive) -> None:
    m = gzip_member(DATA, 9, **header)
    for src in (m, m + b"garbage" * 10, m + gzip_member(b"next member")):
        got = impl.decode_chunk(src, "gzip", 0, len(DATA), sha(DATA), exclusive, max_trailing=0)
        assert got == DATA


def test_stdlib_gzip_and_multi_member(impl) -> None:
    blob = gzip.compress(DATA, 6, mtime=0) + gzip.compress(b"second", 1)
    assert impl.decode_chunk(blob, "gzip", 100, 1000, None) == DATA[100:1100]


@pytest.mark.parametrize("exclusive", [True, False])
def test_gzip_trailer_checked(impl, exclusive) -> None:
    m = gzip_member(DATA)
    crc, isize = struct.unpack("<II", m[-8:])
    for bad in (
        m[:-8] + struct.pack("<II", crc ^ 1, isize),
        m[:-8] + struct.pack("<II", crc, isize + 1),
    ):
        # the trailer is read when the member is inflated to its end
        with pytest.raises(ChunkError, match="corrupt gzip member"):
            impl.decode_chunk(bad, "gzip", 0, len(DATA), None, exclusive)
    # a shared member's trailer is not reached when the chunk ends before it
    bad = m[:-8] + struct.pack("<II", crc ^ 1, isize)
    if not exclusive:
        assert impl.decode_chunk(bad, "gzip", 0, 100, None, False) == DATA[:100]


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_bad_inputs(impl, compression) -> None:
    m = compress(compression, DATA, 9 if compression == "gzip" else 3)
    n = len(DATA)
    with pytest.raises(ChunkError, match="chunk is short: "):
        impl.decode_chunk(m, compression, 0, n + 1, None, False)
    with pytest.raises(ChunkError, match="chunk is short: "):
        impl.decode_chunk(m, compression, n + 1, 0, None, False)
    with pytest.raises(ChunkError, match="chunk is short: "):
        impl.decode_chunk(m, compression, 10, n, None, True)
    for cut in (0, 1, 3, 9, 20, len(m) // 2, len(m) - 1):
        with pytest.raises(ChunkError, match="chunk is (truncated|short)|corrupt"):
            impl.decode_chunk(m[:cut], compression, 0, n, None, True)
    with pytest.raises(ChunkError, match="corrupt"):
        impl.decode_chunk(b"\0" * 64, compression, 0, 10, None)
    with pytest.raises(DigestMismatch) as ei:
        impl.decode_chunk(m, compression, 0, n, sha(b"something else"), True)
    assert str(ei.value) == (
        f"sha256 mismatch: want sha256:{sha(b'something else').hex()}, got sha256:{sha(DATA).hex()}"
    )
    # the window [inner, inner + size) is what is hashed
    assert impl.decode_chunk(m, compression, 7, 5, sha(DATA[7:12]), False) == DATA[7:12]
    assert impl.decode_chunk(m, compression, n, 0, sha(b""), True) == b""


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_corrupted_byte(impl, compression) -> None:
    data = os.urandom(2000) + DATA
    m = bytearray(compress(compression, data, 6 if compression == "gzip" else 3))
    failures = 0
    for pos in range(0, len(m), max(1, len(m) // 97)):
        bad = bytearray(m)
        bad[pos] ^= 0x55
        with pytest.raises((ChunkError, DigestMismatch)):
            impl.decode_chunk(bytes(bad), compression, 0, len(data), sha(data), True)
        failures += 1
    assert failures > 50


def test_argument_checks(impl) -> None:
    m = gzip_member(b"x")
    with pytest.raises(ValueError, match="unknown chunk compression"):
        impl.decode_chunk(m, "bzip2", 0, 1, None)
    with pytest.raises(ValueError, match="negative"):
        impl.decode_chunk(m, "gzip", -1, 1, None)
    with pytest.raises(ValueError, match="negative"):
        impl.decode_chunk(m, "gzip", 0, -1, None)
    with pytest.raises(ValueError, match="negative"):
        impl.decode_chunk(m, "gzip", 0, 1, None, True, max_trailing=-1)
    with pytest.raises(ValueError, match="32 raw bytes"):
        impl.decode_chunk(m, "gzip", 0, 1, b"\0" * 31)
    with pytest.raises(ValueError, match="32 raw bytes"):
        impl.decode_chunk(m, "gzip", 0, 1, "sha256:" + "0" * 64)


def test_zstd_frame_variants(impl) -> None:
    data = DATA * 20  # > 128 KiB: several blocks
    for kw in (
        {},
        {"checksum": False},
        {"content_size": False},
        {"checksum": False, "content_size": False},
        {"level": 19},
        {"level": -5},
    ):
        f = zstd_frame(data, **kw)
        for src in (f, f + zstd_frame(b"next"), f + b"\x00garbage"):
            assert (
                impl.decode_chunk(src, "zstd", 0, len(data), sha(data), True, max_trailing=0)
                == data
            )
            assert impl.decode_chunk(src, "zstd", 1000, 70000, None, False) == data[1000:71000]
    skippable = b"\x50\x2a\x4d\x18" + struct.pack("<I", 4) + b"abcd"
    assert impl.decode_chunk(skippable, "zstd", 0, 0, None, True) == b""
    with pytest.raises(ChunkError, match="chunk is short"):
        impl.decode_chunk(skippable, "zstd", 0, 1, None, True)


def test_zstd_checksum_checked(impl) -> None:
    f = bytearray(zstd_frame(DATA, checksum=True))
    f[-1] ^= 1
    with pytest.raises(ChunkError, match="corrupt zstd frame"):
        impl.decode_chunk(bytes(f), "zstd", 0, len(DATA), None, True)


@pytest.mark.parametrize("data", [b"", b"abc", os.urandom(100_000), bytes(1 << 20)])
def test_sha256(impl, data) -> None:
    assert impl.sha256(data) == hashlib.sha256(data).digest()
    assert impl.sha256(bytearray(data)) == hashlib.sha256(data).digest()
    assert impl.sha256(memoryview(data)) == hashlib.sha256(data).digest()


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_threads(impl, compression) -> None:
    """Many threads at once (the zstd context is per thread; the GIL is released)."""
    payloads = [os.urandom(50) * (1000 + i) for i in range(64)]
    members = [compress(compression, p, 6 if compression == "gzip" else 3) for p in payloads]

    def job(i: int) -> bool:
        p, m = payloads[i], members[i]
        return impl.decode_chunk(m, compression, 3, len(p) - 3, sha(p[3:]), True) == p[3:]

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(job, list(range(64)) * 4))


# --- decompression bombs -------------------------------------------------------------

BOMB_SCRIPT = textwrap.dedent(
    """
    import resource, sys, time, zlib, zstandard
    from stargz.estargz import codec
    from stargz.errors import DecompressionBombError
    impl = codec.native if sys.argv[1] == "native" else codec.python
    compression = sys.argv[2]
    zero = bytes(1 << 20)
    if compression == "gzip":
        co = zlib.compressobj(9, zlib.DEFLATED, 31)
        src = b"".join(co.compress(zero) for _ in range(256)) + co.flush()
    else:
        w = zstandard.ZstdCompressor(level=3).compressobj()
        src = b"".join(w.compress(zero) for _ in range(256)) + w.flush()
    del zero
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    for kw in ({}, {"max_trailing": 0}):
        try:
            impl.decode_chunk(src, compression, 0, 4096, None, True, **kw)
        except DecompressionBombError as e:
            assert "chunk inflates past its declared size 4096" in str(e), e
        else:
            raise SystemExit("no DecompressionBombError")
    # shared members stop as soon as the chunk is out
    assert impl.decode_chunk(src, compression, 0, 4096, None, False) == bytes(4096)
    took = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(len(src), took, (after - before) * 1024)
    """
)


@pytest.mark.parametrize("backend", ["native", "python"])
@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_bomb(backend, compression) -> None:
    """A 4 KiB chunk whose member inflates to 256 MiB: DecompressionBombError, fast, small."""
    _backend(backend)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    r = subprocess.run(
        [sys.executable, "-c", BOMB_SCRIPT, backend, compression],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr + r.stdout
    src_len, took, grew = r.stdout.split()
    assert int(src_len) < 2 << 20  # really a bomb: < 2 MiB in, 256 MiB out
    assert int(grew) < 64 << 20, f"peak RSS grew by {int(grew) >> 20} MiB"
    assert float(took) < 30, f"took {took} s"  # a hang guard, not a benchmark


# --- property tests: random payloads, levels, windows, both backends agree ----------


@st.composite
def payloads(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "text", "runs", "mixed"]))
    if kind == "random":
        return draw(st.binary(max_size=5000))
    if kind == "text":
        words = draw(st.lists(st.sampled_from([b"usr", b"lib", b"/", b"\n", b"python", b"3.11"])))
        return b"".join(words) * draw(st.integers(1, 300))
    if kind == "runs":
        return b"".join(
            bytes([b]) * n
            for b, n in draw(
                st.lists(st.tuples(st.integers(0, 255), st.integers(1, 70000)), max_size=6)
            )
        )
    return draw(st.binary(max_size=2000)) * draw(st.integers(1, 200))


SETTINGS = settings(
    max_examples=int(os.environ.get("STARGZ_HYPOTHESIS_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@SETTINGS
@given(
    data=payloads(),
    compression=st.sampled_from(["gzip", "zstd"]),
    level=st.integers(0, 9),
    window=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    exclusive=st.booleans(),
    max_trailing=st.sampled_from([0, 1, 100, 1 << 16, 16 << 20]),
    after=st.sampled_from([b"", b"\x1f\x8b\x08\x00garbage", b"\x28\xb5\x2f\xfd", None]),
)
def test_random_windows(
    both, data, compression, level, window, exclusive, max_trailing, after
) -> None:
    level = level if compression == "gzip" else level * 2 - 1  # zstd: -1..17
    m = compress(compression, data, level)
    if after is None:
        after = compress(compression, b"another member", 1)
    src = m + after
    inner = int(window[0] * len(data))
    size = int(window[1] * (len(data) - inner))
    want = data[inner : inner + size]
    tail = len(data) - inner - size
    for impl in both:
        if exclusive and tail > max_trailing:
            with pytest.raises(DecompressionBombError, match=f"declared size {size}"):
                impl.decode_chunk(
                    src, compression, inner, size, sha(want), True, max_trailing=max_trailing
                )
        else:
            got = impl.decode_chunk(
                src, compression, inner, size, sha(want), exclusive, max_trailing=max_trailing
            )
            assert got == want
        # asking for one byte more than the member has
        with pytest.raises(ChunkError, match="chunk is short"):
            impl.decode_chunk(src, compression, inner, len(data) - inner + 1, None, exclusive)


@SETTINGS
@given(
    data=payloads(),
    compression=st.sampled_from(["gzip", "zstd"]),
    level=st.integers(1, 9),
    cut=st.floats(0, 1),
    flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=3),
    window=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    use_digest=st.booleans(),
)
def test_damaged_members_agree(
    both, data, compression, level, cut, flips, window, use_digest
) -> None:
    """Truncated or bit-flipped members: both backends fail (or succeed) the same way."""
    m = bytearray(compress(compression, data, level))
    for where, x in flips:
        m[min(int(where * len(m)), len(m) - 1)] ^= x
    m = bytes(m[: max(0, int(cut * len(m)) if cut < 0.5 else len(m))])
    inner = int(window[0] * len(data))
    size = int(window[1] * (len(data) - inner))
    digest = sha(data[inner : inner + size]) if use_digest else None
    # Exclusive: the whole member is read, so all backends must reach the same verdict.
    results = [
        outcome(impl.decode_chunk, m, compression, inner, size, digest, True) for impl in both
    ]
    assert all(r == results[0] for r in results), results
    if results[0][1] is not None and digest is not None:
        assert results[0][1] == data[inner : inner + size]


@SETTINGS
@given(data=payloads(), compression=st.sampled_from(["gzip", "zstd"]), cut=st.integers(0, 400))
def test_truncated_shared_member(both, data, compression, cut) -> None:
    """Non-exclusive decode of a cut member: ok iff the chunk's bytes were decodable."""
    assume(len(data) > 0)
    m = compress(compression, data, 6)
    m = m[: max(0, len(m) - cut)]
    results = [
        outcome(impl.decode_chunk, m, compression, 0, len(data), sha(data), False) for impl in both
    ]
    assert results[0] in ((None, data), (ChunkError, None))
    assert all(r == results[0] for r in results), results


def test_bomb_is_fast_in_process(impl) -> None:
    """Smaller bomb in process: 64 MiB of zeros behind a 1-byte chunk, max_trailing 1 MiB."""
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    zero = bytes(1 << 20)
    src = b"".join(co.compress(zero) for _ in range(64)) + co.flush()
    t = time.perf_counter()
    with pytest.raises(DecompressionBombError):
        impl.decode_chunk(src, "gzip", 0, 1, None, True, max_trailing=1 << 20)
    assert time.perf_counter() - t < 10


def test_reserved_gzip_flag_bits_are_refused(both) -> None:
    """RFC 1952: reserved FLG bits must be zero (ISA-L ignores them; both backends refuse),
    even when the window asked for is empty. Found by hypothesis."""
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    member = bytearray(c.compress(b"\x00\x01\x02" * 4) + c.flush())
    member[3] |= 0x20
    for impl in both:
        with pytest.raises(ChunkError):
            impl.decode_chunk(bytes(member), "gzip", 0, 0, None, True)
