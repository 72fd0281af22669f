"""TOC index (ChunkTable, NameTable): native backend and twin against a brute-force model.

Every test runs over both backends. A missing native module is a failure (CI always builds
it), unless ``STARGZ_NO_EXTENSIONS=1`` says the twin is all there is.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib
from array import array
from types import ModuleType

import pytest
import zstandard
from conftest import NO_EXTENSIONS, backend_of, backends_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stargz.errors import ChunkError, TOCError, UnsafePathError
from stargz.estargz import tocindex


def _backend(name: str) -> ModuleType:
    return backend_of(tocindex, name)


@pytest.fixture(params=["native", "python"])
def impl(request) -> ModuleType:
    return _backend(request.param)


@pytest.fixture(scope="module")
def both() -> list[ModuleType]:
    return backends_of(tocindex)


def test_selector() -> None:
    if NO_EXTENSIONS:
        assert tocindex.backend == "python" and tocindex.native is None
    else:
        assert tocindex.native is not None, tocindex.native_error
        assert tocindex.backend == "native"
        assert tocindex.ChunkTable is tocindex.native.ChunkTable


SETTINGS = settings(
    max_examples=int(os.environ.get("STARGZ_HYPOTHESIS_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def outcome(fn, *args):
    try:
        return None, fn(*args)
    except (ChunkError, TOCError, ValueError, TypeError, OverflowError) as e:
        return (type(e), str(e)), None


# --- ChunkTable ----------------------------------------------------------------------


class ChunkModel:
    """The brute-force reference: a list of rows and linear scans."""

    def __init__(self, rows: list[tuple[int, int, int, int, int, bytes]]) -> None:
        self.rows = rows  # (file_id, chunk_offset, comp_offset, inner_offset, size, digest)

    def find(self, f: int, off: int) -> int:
        hits = [i for i, r in enumerate(self.rows) if r[0] == f and r[1] <= off < r[1] + r[4]]
        return hits[0] if hits else -1

    def span(self, f: int) -> tuple[int, int]:
        idx = [i for i, r in enumerate(self.rows) if r[0] == f]
        if not idx:
            lo = sum(1 for r in self.rows if r[0] < f)
            return lo, lo
        return idx[0], idx[-1] + 1

    def cover(self, f: int, off: int, length: int) -> tuple[int, int]:
        idx = [
            i
            for i, r in enumerate(self.rows)
            if r[0] == f and r[4] > 0 and max(r[1], off) < min(r[1] + r[4], off + length)
        ]
        if not idx:
            lo = self.span(f)[0]
            return lo, lo
        return idx[0], idx[-1] + 1

    def next_comp_offset(self, i: int, end: int) -> int:
        bigger = [r[2] for r in self.rows if r[2] > self.rows[i][2]]
        return min(bigger) if bigger else end

    def shares_member(self, i: int) -> bool:
        return sum(r[2] == self.rows[i][2] for r in self.rows) > 1


@st.composite
def chunk_tables(draw):
    """Valid tables: files with ids ascending, chunks tiling each file from 0."""
    rows = []
    fids = sorted(draw(st.sets(st.integers(0, 60), max_size=12)))
    comps = draw(st.lists(st.integers(0, 5000), min_size=1, max_size=8))
    for f in fids:
        off = 0
        for size in draw(st.lists(st.integers(0, 40), min_size=1, max_size=5)):
            digest = draw(st.sampled_from([bytes(32), bytes(range(32)), os.urandom(32)]))
            rows.append(
                (f, off, draw(st.sampled_from(comps)), draw(st.integers(0, 9)), size, digest)
            )
            off += size
    return rows


def build(impl: ModuleType, rows, as_array: bool = True):
    cols = list(zip(*rows, strict=True)) if rows else [(), (), (), (), (), ()]
    mk = (lambda c: array("q", c)) if as_array else list
    return impl.ChunkTable(*(mk(c) for c in cols[:5]), b"".join(cols[5]))


@SETTINGS
@given(
    rows=chunk_tables(),
    as_array=st.booleans(),
    probes=st.lists(st.tuples(st.integers(-2, 62), st.integers(-3, 250)), max_size=40),
)
@pytest.mark.parametrize("scale", [1, 10**12])  # dense ids (CSR index) and sparse ones
def test_chunk_table_vs_model(both, scale, rows, as_array, probes) -> None:
    rows = [(r[0] * scale, *r[1:]) for r in rows]
    probes = [(f * scale if f > 0 else f, off) for f, off in probes]
    model = ChunkModel(rows)
    blob_end = 10**6
    for impl in both:
        t = build(impl, rows, as_array)
        assert len(t) == len(rows)
        assert t.nbytes >= 32 * len(rows)
        for i, r in enumerate(rows):
            assert t.row(i) == (r[1], r[2], r[3], r[4], r[5])
            assert t.file_id(i) == r[0]
            assert t.next_comp_offset(i, blob_end) == model.next_comp_offset(i, blob_end)
            assert t.shares_member(i) == model.shares_member(i)
            if r[4] > 0:
                assert t.find(r[0], r[1]) == i
                assert t.find(r[0], r[1] + r[4] - 1) == i
        for f, off in probes:
            assert t.find(f, off) == model.find(f, off), (f, off)
            assert t.span(f) == model.span(f), f
            for length in (0, 1, 7, 100):
                assert t.cover(f, off, length) == model.cover(f, off, length), (f, off, length)
        for bad in (-1, len(rows)):
            with pytest.raises(IndexError):
                t.row(bad)
            with pytest.raises(IndexError):
                t.next_comp_offset(bad, blob_end)
            with pytest.raises(IndexError):
                t.shares_member(bad)


@SETTINGS
@given(
    rows=chunk_tables(),
    edit=st.tuples(st.integers(0, 1000), st.integers(0, 5), st.integers(-3, 3)),
    swap=st.booleans(),
)
def test_chunk_table_rejects_bad_rows_alike(both, rows, edit, swap) -> None:
    """Damaged tables: both backends raise the same error with the same message, or agree."""
    rows = [list(r) for r in rows]
    if rows:
        i, col, delta = edit
        i %= len(rows)
        if col < 5:
            rows[i][col] += delta
        if swap and len(rows) > 1:
            rows[0], rows[-1] = rows[-1], rows[0]
    rows = [tuple(r) for r in rows]
    results = []
    for impl in both:
        r = outcome(build, impl, rows)
        results.append(r[0] if r[0] else [r[1].row(i) for i in range(len(rows))])
    assert all(r == results[0] for r in results), results
    # and the verdict is right
    valid = _valid(rows)
    assert (not isinstance(results[0], tuple)) == valid, (results[0], rows)


def _valid(rows) -> bool:
    prev_f, end = -1, 0
    for f, o, c, inner, size, _ in rows:
        if min(f, o, c, inner, size) < 0:
            return False
        if f != prev_f:
            if f < prev_f or o != 0:
                return False
        elif o != end:
            return False
        prev_f, end = f, o + size
    return True


def test_chunk_table_errors(impl) -> None:
    z = bytes(32)
    with pytest.raises(ChunkError, match="differ in length"):
        impl.ChunkTable([1, 2], [0], [0], [0], [1], z)
    with pytest.raises(ChunkError, match="digests are 31 bytes"):
        impl.ChunkTable([1], [0], [0], [0], [1], z[:31])
    with pytest.raises(ChunkError, match="negative comp_offset -5"):
        impl.ChunkTable([1], [0], [-5], [0], [1], z)
    with pytest.raises(ChunkError, match="not sorted"):
        impl.ChunkTable([2, 1], [0, 0], [0, 0], [0, 0], [1, 1], z * 2)
    with pytest.raises(ChunkError, match="starts at offset 3, not 0"):
        impl.ChunkTable([1], [3], [0], [0], [1], z)
    with pytest.raises(ChunkError, match="overlap"):
        impl.ChunkTable([1, 1], [0, 5], [0, 0], [0, 0], [10, 1], z * 2)
    with pytest.raises(ChunkError, match="leave a gap"):
        impl.ChunkTable([1, 1], [0, 11], [0, 0], [0, 0], [10, 1], z * 2)
    big = 2**62
    with pytest.raises(ChunkError, match="overflows"):
        impl.ChunkTable([1, 1], [0, big], [0, 0], [0, 0], [big, big], z * 2)
    with pytest.raises(OverflowError):
        impl.ChunkTable([1], [0], [2**63], [0], [1], z)
    empty = impl.ChunkTable([], [], [], [], [], b"")
    assert len(empty) == 0 and empty.find(0, 0) == -1 and empty.span(3) == (0, 0)
    t = impl.ChunkTable([1], [0], [0], [0], [10], z)
    assert t.cover(1, 5, 2**63 - 1) == (0, 1)
    t.__init__([2, 2], [0, 3], [0, 9], [0, 0], [3, 3], z * 2)  # re-init rebuilds
    assert len(t) == 2 and t.find(2, 4) == 1 and t.find(1, 0) == -1


def test_chunk_table_big(both) -> None:
    """150k rows, array('q') input: spot checks against the model's arithmetic."""
    n_files, per = 50_000, 3
    fid = array("q", (f for f in range(n_files) for _ in range(per)))
    coff = array("q", (k * 100 for _ in range(n_files) for k in range(per)))
    comp = array("q", (i * 7 for i in range(n_files * per)))
    inner = array("q", bytes(8 * n_files * per))
    size = array("q", [100]) * (n_files * per)
    digests = bytes(32 * n_files * per)
    for impl in both:
        t = impl.ChunkTable(fid, coff, comp, inner, size, digests)
        assert len(t) == n_files * per
        for f in (0, 1, 777, n_files - 1):
            assert t.span(f) == (f * per, f * per + per)
            assert t.find(f, 0) == f * per
            assert t.find(f, 250) == f * per + 2
            assert t.find(f, 300) == -1
        assert t.next_comp_offset(len(t) - 1, 1) == 1
        assert t.next_comp_offset(10, 0) == 77


def _read_toc(blob: bytes) -> dict:
    if blob[:2] == b"\x1f\x8b":
        toc_off = int(blob[-51:][16:32], 16)
        raw = zlib.decompressobj(31).decompress(blob[toc_off:])
        with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
            return json.loads(tf.extractfile(tf.next()).read())  # type: ignore[arg-type,union-attr]
    toc_off, clen, ulen, _ = struct.unpack("<4Q", blob[-40:-8])
    return json.loads(
        zstandard.ZstdDecompressor().decompress(
            blob[toc_off : toc_off + clen], max_output_size=ulen
        )
    )


def table_inputs(toc: dict):
    """(ids, parents, names, chunk rows) as a reader would derive them from a TOC."""
    ids: dict[str, int] = {"": 0}
    parents, names = [-1], [b""]
    rows = []
    size = 0

    def node(path: str) -> int:  # creating implicit parent directories, as Go does
        if path not in ids:
            parent, _, base = path.rpartition("/")
            pid = node(parent)
            ids[path] = len(parents)
            parents.append(pid)
            names.append(base.encode())
        return ids[path]

    for e in toc["entries"]:
        name = e["name"].strip("/")
        if e["type"] != "chunk" and name:
            node(name)
        if e["type"] == "reg":
            size = e.get("size", 0)
        if e["type"] in ("reg", "chunk") and size:
            csize = e.get("chunkSize") or size - e.get("chunkOffset", 0)
            digest = bytes.fromhex(e["chunkDigest"].removeprefix("sha256:"))
            off, inner = e.get("chunkOffset", 0), e.get("innerOffset", 0)
            rows.append((ids[name], off, e["offset"], inner, csize, digest))
    return ids, parents, names, rows


@pytest.mark.parametrize("tag", ["esgz", "esgz-64k", "zstdchunked"])
def test_tables_from_real_tocs(impl, corners, tag) -> None:
    """Build both tables from a Go-written TOC and look up every chunk and every name."""
    for layer in corners.layers(tag):
        ids, parents, names, rows = table_inputs(_read_toc(layer.path.read_bytes()))
        t = build(impl, rows)
        for i, r in enumerate(rows):
            assert t.find(r[0], r[1]) == i
            assert t.next_comp_offset(i, 1 << 40) > r[2]
            assert not t.shares_member(i)
        nt = impl.NameTable(parents, names)
        for path, i in ids.items():
            if path:
                assert nt.child(parents[i], names[i]) == i
                assert i in nt.children(parents[i])
        assert nt.children(0) == sorted(nt.children(0), key=lambda i: names[i])


# --- NameTable -----------------------------------------------------------------------

NAME_CHARS = st.sampled_from([b"a", b"b", b"z", b"A", b".", b"\xc3\xa9", b"\xff", b" ", b"-", b"0"])
names_st = st.one_of(
    st.lists(NAME_CHARS, min_size=1, max_size=6).map(b"".join),
    # long names sharing their first 8+ bytes (the native side compares 8-byte prefixes)
    st.lists(NAME_CHARS, max_size=4).map(lambda parts: b"libpython3.11" + b"".join(parts)),
    st.lists(NAME_CHARS, max_size=2).map(
        lambda parts: b"abcdefgh"[: len(parts) * 3] + b"".join(parts)
    ),
)


@st.composite
def name_tables(draw):
    """Valid trees: row 0 is the root; each row's parent is an earlier directory row."""
    n = draw(st.integers(1, 80))
    parents, names = [-1], [b""]
    used: set[tuple[int, bytes]] = set()
    for i in range(1, n):
        p = draw(st.integers(0, i - 1))
        name = draw(names_st)
        if name in (b"", b".", b"..") or (p, name) in used:
            continue
        used.add((p, name))
        parents.append(p)
        names.append(name)
    return parents, names


@SETTINGS
@given(
    table=name_tables(),
    probes=st.lists(st.tuples(st.integers(-2, 90), names_st), max_size=30),
    as_array=st.booleans(),
)
@pytest.mark.parametrize("scale", [1, 10**12])  # dense ids (CSR index) and sparse ones
def test_name_table_vs_model(both, scale, table, probes, as_array) -> None:
    parents = [p * scale if p > 0 else p for p in table[0]]
    names = table[1]
    probes = [(p * scale if p > 0 else p, name) for p, name in probes]
    for impl in both:
        nt = impl.NameTable(array("q", parents) if as_array else parents, names)
        assert len(nt) == len(parents)
        assert nt.nbytes > 0
        for i in range(len(parents)):
            assert nt.name(i) == names[i] and nt.parent(i) == parents[i]
            if parents[i] >= 0:
                assert nt.child(parents[i], names[i]) == i
            pid = i * scale
            kids = [j for j in range(len(parents)) if parents[j] == pid]
            assert nt.children(pid) == sorted(kids, key=lambda j: names[j])
        for p, name in probes:
            want = [
                j for j in range(len(parents)) if parents[j] == p and names[j] == name and p >= 0
            ]
            assert nt.child(p, name) == (want[0] if want else -1)
            assert nt.children(p) == sorted(
                (j for j in range(len(parents)) if parents[j] == p and p >= 0),
                key=lambda j: names[j],
            )
        with pytest.raises(IndexError):
            nt.name(len(parents))
        with pytest.raises(TypeError):
            nt.child(0, "str-not-bytes")


@SETTINGS
@given(
    table=name_tables(),
    edits=st.lists(
        st.tuples(
            st.integers(0, 100),
            st.sampled_from(["dup", "dot", "dotdot", "slash", "nul", "empty", "parent"]),
        ),
        max_size=3,
    ),
)
def test_name_table_rejects_bad_rows_alike(both, table, edits) -> None:
    parents, names = list(table[0]), list(table[1])
    for i, kind in edits:
        i %= len(parents)
        if kind == "dup":
            if len(parents) > 2:
                j = (i + 1) % len(parents) or 1
                parents[i], names[i] = parents[j], names[j]
        elif kind == "parent":
            parents[i] = -2
        else:
            names[i] = {"dot": b".", "dotdot": b"..", "slash": b"a/b", "nul": b"a\0", "empty": b""}[
                kind
            ]
    results = []
    for impl in both:
        r = outcome(impl.NameTable, parents, names)
        results.append(
            r[0] if r[0] else [(r[1].name(i), r[1].parent(i)) for i in range(len(parents))]
        )
    assert all(r == results[0] for r in results), results


def test_name_table_errors(impl) -> None:
    with pytest.raises(TOCError, match="differ in length"):
        impl.NameTable([-1, 0], [b""])
    with pytest.raises(TOCError, match="duplicate entry b'a' in parent 0 \\(also row 1\\)"):
        impl.NameTable([-1, 0, 0, 0], [b"", b"a", b"b", b"a"])
    with pytest.raises(TOCError, match="name must be bytes"):
        impl.NameTable([-1, 0], [b"", "a"])
    with pytest.raises(TOCError, match="parent -2"):
        impl.NameTable([-1, -2], [b"", b"a"])
    with pytest.raises(TOCError, match="empty name"):
        impl.NameTable([-1, 0], [b"", b""])
    for bad in (b".", b"..", b"a/b", b"a\0b"):
        with pytest.raises(UnsafePathError, match="not a plain file name"):
            impl.NameTable([-1, 0], [b"", bad])
    # parents are the caller's ids: node ids with no root row work too (as the reader uses it)
    nt = impl.NameTable([5, 5, 9], [b"x", b"a", b"x"])
    assert nt.child(5, b"x") == 0 and nt.child(9, b"x") == 2 and nt.children(5) == [1, 0]
    assert nt.child(0, b"x") == -1 and nt.children(-1) == []
    nt.__init__([-1, 0], [b"", b"q"])  # re-init rebuilds
    assert len(nt) == 2 and nt.child(0, b"q") == 1 and nt.child(5, b"x") == -1
    empty = impl.NameTable([], [])
    assert len(empty) == 0 and empty.child(0, b"a") == -1 and empty.children(0) == []
