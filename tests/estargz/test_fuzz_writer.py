"""Fuzz: mutated tar layers into the converter (`stargz.estargz.build`).

Seeds: the plain layers of the reference images (``oci-corners`` ``orig``: every corner of
the tar model, as Go's archive/tar wrote it; ``oci-busybox`` ``1``), cut down to a few
hundred bytes per file with their headers kept byte for byte, a small layer of our own,
and tars that are valid but hold what a TOC can't carry (ids, device numbers, names,
times out of range; hardlinks to nothing; files under files). Hypothesis edits header
fields (to values a tar reader trips on, with the checksum fixed or not), flips bytes,
inserts PAX records, cuts, repeats or drops members, and may compress the result (gzip,
zstd, or a damaged stream of either).

Whatever the input, `build` returns or raises a `StargzError`; it never hangs (a hard
time limit) and never writes a blob our reader refuses: a blob it returns opens (with
its TOC digest) and every file reads. Where Python's tarfile reads the input, the layer
read back equals it (`conftest.compare_trees`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import zlib

import pytest
import zstandard
from conftest import OCILayout, compare_trees, find_shared, reader_tree, tar_tree
from fuzzing import fuzz_settings, fuzz_timeout
from hypothesis import event, given
from hypothesis import strategies as st

from stargz.errors import StargzError
from stargz.estargz import Reader, build

from .test_bad_input import DEFAULT_TAR

pytestmark = [pytest.mark.fuzz, fuzz_timeout(120)]

CAP = 300  # bytes of content kept per file of a fixture layer
RESERVED = ("stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark")


def _checksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)


def shrink(raw: bytes, keep_per_dir: int = 4) -> bytes:
    """``raw`` with each file cut to `CAP` bytes and at most ``keep_per_dir`` entries per
    directory; the headers (PAX records too) stay as the tar's writer made them."""
    out = bytearray()
    per_dir: dict[str, int] = {}
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
        for m in tf:
            parent = m.name.rstrip("/").rpartition("/")[0]
            per_dir[parent] = per_dir.get(parent, 0) + 1
            if per_dir[parent] > keep_per_dir and m.isreg():
                continue
            head = bytearray(raw[m.offset : m.offset_data])
            n = m.size
            if m.isreg() and n > CAP:
                n = CAP
                last = bytearray(head[-512:])
                last[124:136] = b"%011o\0" % n
                _checksum(last)
                head[-512:] = last
            out += head + raw[m.offset_data : m.offset_data + n] + bytes(-n % 512)
    return bytes(out + bytes(1024))


def _ti(name: str, **kw) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def _tar(*members: tuple[tarfile.TarInfo, bytes | None], fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, errors="surrogateescape") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _pax(records: list[tuple[str, str]], broken: bool) -> bytes:
    """A PAX extended header block for ``records`` (``broken``: a wrong record length)."""
    body = b""
    for k, v in records:
        kv = (
            b" "
            + k.encode("utf-8", "surrogateescape")
            + b"="
            + v.encode("utf-8", "surrogateescape")
            + b"\n"
        )
        n = len(kv) + 1
        while len(str(n)) + len(kv) != n:
            n += 1
        body += str(n + (7 if broken else 0)).encode() + kv
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = len(body)
    return info.tobuf(tarfile.USTAR_FORMAT) + body + bytes(-len(body) % 512)


D, L, S, C = tarfile.DIRTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE
#: Valid tars holding what the reader refuses or must take care with.
EDGE_TARS = [
    _tar((_ti("c", type=C, devmajor=5000, devminor=1), None)),
    _tar((_ti("c", type=C, devmajor=4095, devminor=(1 << 20) - 1), None)),
    _tar((_ti("f", uid=(1 << 32) - 1, gid=1 << 40), b"x")),
    _tar((_ti("x" * 256), b"")),
    _tar((_ti("/".join(["a"] * 300)), b"")),
    _tar((_ti("h", type=L, linkname="nope"), None)),
    _tar((_ti("d", type=D), None), (_ti("h", type=L, linkname="d"), None)),
    _tar((_ti("s", type=S, linkname="x"), None), (_ti("s/f"), b"x")),
    _tar((_ti("d"), b"x"), (_ti("d/f"), b"y")),
    _tar((_ti("d", type=D), None), (_ti("d"), b"x")),
    _tar((_ti("h", type=L, linkname="f"), None), (_ti("f"), b"late target")),
    _tar((_ti("./"), b"root file")),
    _tar((_ti("f", mtime=10**12), b"")),
    _tar((_ti("f", mtime=253402300799.6), b"")),  # the last second of the year 9999
    _tar((_ti("f", mtime=253402300800), b"")),  # the year 10000
    _tar((_ti("a", mtime=1700000000.7), b""), (_ti("b", mtime=-1.5), b"")),  # PAX fractions
    _pax([("size", "-1")], False) + _tar((_ti("d"), b"")),  # a file was dropped, unaligned
    _tar((_ti("e"), b""), (_ti("f"), b"")),  # (the first size becomes -2^32 below: OSError)
    _tar((_ti("", type=D), None), (_ti("f"), b"x")),  # the root as "": was written as "/"
    _pax([("GNU.sparse.map", "0,1")], True) + _tar((_ti("f"), b"")),  # tarfile's ValueError
    _tar((_ti("f", mtime=-(10**12)), b"")),
    _tar((_ti("\udcff\udcfe"), b"not UTF-8")),
    _tar((_ti("l", type=S, linkname="\udcff"), None)),
    _tar((_ti("f", uname="\udcff", gname="g"), b"")),
    _tar((_ti("n" * 120 + "/" + "m" * 120), b"long"), fmt=tarfile.GNU_FORMAT),
    _tar((_ti("f", pax_headers={"SCHILY.xattr.user.a": "v", "SCHILY.xattr.": "x"}), b"")),
]


def _plain(path) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _seeds() -> list[bytes]:
    seeds = []
    for name, tag in (("oci-corners", "orig"), ("oci-busybox", "1")):
        for layer in OCILayout(find_shared() / "fixtures" / name).layers(tag):
            seeds.append(shrink(_plain(layer.path)))
    return seeds + [DEFAULT_TAR] + EDGE_TARS


SEEDS = _seeds()
# a base-256 size of -2^32 in the header of "e" (tarfile then seeks before the member)
_neg = SEEDS.index(_tar((_ti("e"), b""), (_ti("f"), b"")))
_block = bytearray(SEEDS[_neg][:512])
_block[124:136] = b"\xff" * 8 + bytes(4)  # -(2**32)
_checksum(_block)
SEEDS[_neg] = bytes(_block) + SEEDS[_neg][512:]
#: Where each seed's header blocks are (offsets of 512-byte blocks before a member's data).
HEADERS = []
for _seed in SEEDS:
    try:
        with tarfile.open(fileobj=io.BytesIO(_seed), mode="r:") as _tf:
            HEADERS.append(
                [(m.offset, m.offset_data, m.offset_data + m.size + -m.size % 512) for m in _tf]
            )
    except ValueError:  # (a seed tarfile itself can't read)
        HEADERS.append([])

#: header fields: (offset, length, values worth trying)
NUMBERS = [
    b"0000000\0", b"7777777\0", b"\0" * 8, b" " * 8, b"-1\0", b"99999999", b"0x10\0",
    b"\x80" + bytes(6) + b"\x01", b"\xff" * 8, b"\x80" + b"\xff" * 7, b"1" * 12, b"",
]  # fmt: skip
NAMES = [b"", b"./", b"/", b"../x", b"/abs", b"a/../../b", b"a//b/./c", b"x" * 100,
         b"\xff\xfe", b"a\0b", b".wh..wh..opq", b"stargz.index.json", b".prefetch.landmark",
         b"bin/sh"]  # fmt: skip
FIELDS = [
    (0, 100, NAMES),  # name
    (100, 8, NUMBERS),  # mode
    (108, 8, NUMBERS),  # uid
    (116, 8, NUMBERS),  # gid
    (124, 12, NUMBERS + [b"00000001000\0", b"77777777777\0", b"\x80" + bytes(10) + b"\x10"]),
    (136, 12, NUMBERS + [b"77777777777\0"]),  # mtime
    (148, 8, NUMBERS),  # chksum (left as set)
    (156, 1, [bytes([c]) for c in b"0123456789gxLKSAVDMN\0 "]),  # typeflag
    (157, 100, NAMES),  # linkname
    (257, 8, [b"ustar\x0000", b"ustar  \0", b"\0" * 8, b"USTAR\x0000"]),  # magic+version
    (265, 32, [b"root", b"", b"\xff"]),  # uname
    (329, 8, NUMBERS),  # devmajor
    (337, 8, NUMBERS),  # devminor
    (345, 155, NAMES),  # prefix
]
PAX_RECORDS = [
    ("path", "../up"), ("path", "a/" * 300), ("path", ""), ("linkpath", "/etc/passwd"),
    ("size", "-1"), ("size", "99999999999"), ("size", "x"), ("uid", "4294967295"),
    ("gid", "-5"), ("mtime", "1e300"), ("mtime", "-1.5"), ("mtime", "nan"),
    ("SCHILY.xattr.user.k", "v"), ("SCHILY.xattr.trusted.overlay.opaque", "y"),
    ("SCHILY.xattr.", ""), ("GNU.sparse.map", "0,1"), ("GNU.sparse.major", "1"),
    ("hdrcharset", "BINARY"), ("uname", "\udcff"), ("comment", "x" * 600),
]  # fmt: skip


class Mutant(bytes):
    how: str

    def __repr__(self) -> str:
        return f"<{len(self)}-byte tar: {self.how}>"


@st.composite
def mutated_tars(draw) -> Mutant:
    k = draw(st.integers(0, len(SEEDS) - 1))
    buf = bytearray(SEEDS[k])
    heads = HEADERS[k]
    how = [f"seed {k}"]
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["field", "field", "field", "flip", "pax", "cut", "dup",
                                   "drop", "zeros"]))  # fmt: skip
        if op == "field" and heads:
            start, data_at, _end = draw(st.sampled_from(heads))
            block = data_at - 512  # the member's own header (after any PAX blocks)
            off, size, values = draw(st.sampled_from(FIELDS))
            value = draw(st.sampled_from(values))[:size].ljust(size, b"\0")
            hdr = bytearray(buf[block : block + 512])
            if len(hdr) < 512:
                continue
            hdr[off : off + size] = value
            fix = off != 148 and draw(st.integers(0, 9)) > 0
            if fix:
                _checksum(hdr)
            buf[block : block + 512] = hdr
            how.append(f"field {off} of header at {block} = {value!r}" + (" (sum)" * fix))
        elif op == "flip" and buf:
            pos = draw(st.integers(0, len(buf) - 1))
            buf[pos] ^= draw(st.integers(1, 255))
            how.append(f"flip at {pos}")
        elif op == "pax" and heads:
            start = draw(st.sampled_from(heads))[0]
            records = draw(st.lists(st.sampled_from(PAX_RECORDS), min_size=1, max_size=3))
            broken = draw(st.integers(0, 7)) == 0
            buf[start:start] = _pax(records, broken)
            how.append(f"PAX {records} at {start}" + (" (bad length)" * broken))
            heads = []  # (offsets moved)
        elif op == "cut":
            pos = draw(st.integers(0, len(buf)))
            del buf[pos:]
            how.append(f"cut at {pos}")
        elif op in ("dup", "drop") and heads:
            start, _, end = draw(st.sampled_from(heads))
            if op == "dup":
                buf[start:start] = buf[start:end]
            else:
                del buf[start:end]
            how.append(f"{op} member at {start}")
            heads = []
        elif op == "zeros" and heads:
            start = draw(st.sampled_from(heads))[0]
            buf[start:start] = bytes(512)
            how.append(f"zero block at {start}")
            heads = []
    out = Mutant(bytes(buf))
    out.how = ", ".join(how)
    return out


class Case(tuple):
    """(mutant, plain tar or None, input bytes), shown by how the mutant was made."""

    def __repr__(self) -> str:
        return repr(self[0])


@st.composite
def inputs(draw) -> Case:
    """(mutant, the plain tar in the input or None if its compression is broken, what
    `build` reads: the tar, compressed or not, maybe damaged)."""
    tar = draw(mutated_tars())
    wrap = draw(st.sampled_from(["plain", "plain", "plain", "gzip", "zstd", "bad-gzip",
                                 "bad-zstd"]))  # fmt: skip
    if wrap == "plain":
        return Case((tar, bytes(tar), bytes(tar)))
    data = gzip.compress(tar, 1) if "gzip" in wrap else zstandard.compress(tar, 1)
    if wrap.startswith("bad"):
        pos = draw(st.integers(0, len(data) - 1))
        if draw(st.booleans()):
            data = data[:pos]
        else:
            data = data[:pos] + bytes([data[pos] ^ 0x41]) + data[pos + 1 :]
    tar.how += f", {wrap}"
    return Case((tar, strict_decompress(data), data))


def strict_decompress(data: bytes) -> bytes | None:
    """The plain tar in ``data`` by the standard library's / zstandard's one-shot
    decoders (which refuse a truncated stream), or None."""
    try:
        if data[:2] == b"\x1f\x8b":
            return gzip.decompress(data)
        return zstandard.ZstdDecompressor().decompress(data)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError):
        return None


def convert(data: bytes, **kw) -> tuple[object, bytes] | StargzError:
    out = io.BytesIO()
    try:
        res = build(io.BytesIO(data), out, workers=2, **kw)
    except StargzError as e:
        return e
    return res, out.getvalue()


def check_blob(res, blob: bytes) -> Reader:
    """The blob `build` returned is what it says, and opens."""
    assert res.blob_size == len(blob)
    assert res.blob_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    try:
        return Reader(lambda off, n: blob[off : off + n], len(blob), toc_digest=res.toc_digest)
    except StargzError as e:
        pytest.fail(f"wrote a blob our reader refuses: {type(e).__name__}: {e}")


def input_tree(tar: bytes) -> dict | None:
    """What tarfile makes of the input, or None where it can't read it. (The TOC and
    landmark entries of an input that is eStargz already are replaced, on purpose.)"""
    try:
        tree = tar_tree(tar)
    except (tarfile.TarError, KeyError, OSError, EOFError, ValueError):
        return None
    for name in RESERVED:
        # (still its children's parent; `reader_tree` leaves out the landmark paths)
        if name == RESERVED[0] and any(k.startswith(name + "/") for k in tree):
            tree[name] = {"type": "dir", "implicit": True}
        else:
            tree.pop(name, None)
    return tree


@fuzz_settings(800, deadline_s=10)
@given(
    case=inputs(),
    compression=st.sampled_from(["gzip", "zstd"]),
    chunk=st.sampled_from([3, 64, 512, 4096, 1 << 20]),
    prioritize=st.lists(
        st.sampled_from(["etc/greeting", "bin/sh", "nope", "data", "h"]), max_size=2
    ),  # fmt: skip
)
def test_mutated_tars_convert_and_read_back(case, compression, chunk, prioritize) -> None:
    _, plain, data = case
    got = convert(data, compression=compression, chunk_size=chunk, level=1,
                  prioritized_files=prioritize, allow_missing_prioritized=True)  # fmt: skip
    if isinstance(got, StargzError):
        # (the last check before the footer: only a writer bug gets there)
        assert "the converted layer's TOC does not open" not in str(got)
        event(f"refused: {type(got).__name__}")
        return
    assert plain is not None, "converted a layer whose compressed stream is broken"
    res, blob = got
    reader = check_blob(res, blob)
    back = reader_tree(reader)  # every file read whole
    want = input_tree(plain)
    if want is None:
        event("converted, input unreadable by tarfile")
        return
    compare_trees(back, want)
    event("converted and equal")


@pytest.mark.parametrize("k", range(len(SEEDS)))
def test_seeds_convert_or_are_refused(k: int) -> None:
    """Control: each seed as it is (the fixture ones must convert and read back)."""
    got = convert(SEEDS[k], compression="gzip", chunk_size=64)
    if isinstance(got, StargzError):
        assert k >= len(SEEDS) - len(EDGE_TARS), f"a fixture seed is refused: {got}"
        assert "the converted layer's TOC does not open" not in str(got)  # (a writer bug)
        return
    res, blob = got
    compare_trees(reader_tree(check_blob(res, blob)), tar_tree(SEEDS[k]))


_GZ = gzip.compress(DEFAULT_TAR, 1)
_ZST = zstandard.compress(DEFAULT_TAR, 1)


@pytest.mark.parametrize(
    "data",
    [
        _ZST[:-40],  # ends inside the frame: was converted, silently, as part of the layer
        _ZST[:30],
        _ZST[:6] + bytes([_ZST[6] ^ 0x41]) + _ZST[7:],  # was zstandard's ZstdError
        _GZ[:40] + bytes([_GZ[40] ^ 0x41]) + _GZ[41:],  # was isal's IsalError
        _GZ[:-5],
    ],
    ids=["zstd-cut-late", "zstd-cut-early", "zstd-bad-byte", "gzip-bad-byte", "gzip-cut"],
)
def test_broken_compression_is_refused(data: bytes) -> None:
    """Found by the fuzzer: a broken compressed input is a FormatError, never a
    traceback, a leaked temp file or a layer converted from part of the input."""
    assert strict_decompress(data) is None
    got = convert(data, compression="gzip", chunk_size=64)
    assert isinstance(got, StargzError), "converted"
    assert "input layer does not decompress" in str(got)


@pytest.mark.parametrize("wrap", ["plain", "gzip"])
def test_negative_size_is_refused(wrap: str) -> None:
    """Found by the fuzzer: a base-256 size of -2^32 made tarfile seek before the member
    (an OSError traceback on a gzip input's temporary file)."""
    data = SEEDS[_neg] if wrap == "plain" else gzip.compress(SEEDS[_neg])
    got = convert(data, compression="gzip", chunk_size=64)
    assert isinstance(got, StargzError), "converted"
    assert "tar entry 'e': negative size -4294967296" in str(got)
