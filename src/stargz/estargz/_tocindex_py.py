"""TOC index, pure Python: the twin of the native ``_tocindex`` module.

This module is the reference for the contract; ``src/_native/_tocindex.pyx`` must behave
the same (``tests/estargz/test_tocindex.py`` runs both against a brute-force model). Use it
through ``stargz.estargz.tocindex``.

Integers cross the seam, not objects: the reader numbers files and directory entries itself
and asks these tables for row numbers; nothing here allocates a Python object per TOC entry
on the lookup path.

``ChunkTable`` holds one row per chunk (a ``reg`` entry with content, or a ``chunk`` entry):
the file it belongs to, where it sits in the file (``chunk_offset``, ``size``), where its
compressed member starts in the blob (``comp_offset``, the TOC ``offset``), where it sits in
that member's output (``inner_offset``) and its sha256 (``digest``, 32 raw bytes, all zero
when the TOC has none). Rows are sorted by ``(file_id, chunk_offset)``, and a file's chunks
tile it from offset 0 without gaps or overlaps.

``NameTable`` maps ``(parent, name)`` to a row number: row ``i`` is the directory entry
``names[i]`` of parent ``parents[i]``. The ids in ``parents`` are the caller's (for
example node ids, or the row ids themselves with ``-1`` for the root); rows whose parent is
``-1`` are roots and are never anyone's child.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Sequence

from stargz.errors import ChunkError, TOCError, UnsafePathError

__all__ = ["ChunkTable", "NameTable"]

_INT64_MAX = (1 << 63) - 1


def _column(values: Sequence[int], name: str, n: int | None) -> array:
    col = values if isinstance(values, array) and values.typecode == "q" else array("q", values)
    if n is not None and len(col) != n:
        raise ChunkError(f"chunk table columns differ in length: {name} has {len(col)}, want {n}")
    return col


class ChunkTable:
    """Chunks of every file of a layer, sorted by ``(file_id, chunk_offset)``."""

    def __init__(
        self,
        file_ids: Sequence[int],
        chunk_offsets: Sequence[int],
        comp_offsets: Sequence[int],
        inner_offsets: Sequence[int],
        sizes: Sequence[int],
        digests: bytes,
    ) -> None:
        """Build the table; raise ``ChunkError`` if the rows are inconsistent.

        All columns are int sequences of the same length n (``array('q')`` is taken as is,
        anything else is copied); ``digests`` is 32*n raw bytes. Rejected: a negative value,
        rows out of ``(file_id, chunk_offset)`` order, a file whose first chunk does not
        start at 0, chunks of a file that overlap or leave a gap.
        """
        fid = _column(file_ids, "file_ids", None)
        n = len(fid)
        coff = _column(chunk_offsets, "chunk_offsets", n)
        comp = _column(comp_offsets, "comp_offsets", n)
        inner = _column(inner_offsets, "inner_offsets", n)
        size = _column(sizes, "sizes", n)
        digests = bytes(digests)
        if len(digests) != 32 * n:
            raise ChunkError(f"chunk digests are {len(digests)} bytes, want 32 * {n} rows")
        for name, col in (
            ("file_id", fid),
            ("chunk_offset", coff),
            ("comp_offset", comp),
            ("inner_offset", inner),
            ("size", size),
        ):
            if n and min(col) < 0:
                i = next(i for i, v in enumerate(col) if v < 0)
                raise ChunkError(f"chunk row {i}: negative {name} {col[i]}")
        prev_f, prev_end = -1, 0
        for i in range(n):
            f, o = fid[i], coff[i]
            if f != prev_f:
                if f < prev_f:
                    raise ChunkError(
                        f"chunk row {i}: rows are not sorted by (file_id, chunk_offset): "
                        f"file {f} after file {prev_f}"
                    )
                if o != 0:
                    raise ChunkError(f"chunk row {i}: file {f} starts at offset {o}, not 0")
            elif o != prev_end:
                what = "overlap" if o < prev_end else "leave a gap"
                raise ChunkError(
                    f"chunk row {i}: chunks of file {f} {what}: chunk offset {o}, "
                    f"previous chunk ends at {prev_end}"
                )
            if size[i] > _INT64_MAX - o:
                raise ChunkError(f"chunk row {i}: chunk offset {o} + size {size[i]} overflows")
            prev_f, prev_end = f, o + size[i]
        self._fid, self._coff, self._comp, self._inner, self._size = fid, coff, comp, inner, size
        self._digests = digests
        uniq = sorted(set(comp))
        self._uniq = array("q", uniq)
        counts: dict[int, int] = {}
        for c in comp:
            counts[c] = counts.get(c, 0) + 1
        self._shared = bytes(1 if counts[c] > 1 else 0 for c in comp)

    def __len__(self) -> int:
        return len(self._fid)

    def find(self, file_id: int, offset: int) -> int:
        """Row of ``file_id``'s chunk that contains file offset ``offset``, or -1."""
        lo = bisect_left(self._fid, file_id)
        hi = bisect_right(self._fid, file_id, lo)
        if lo == hi or offset < 0:
            return -1
        i = bisect_right(self._coff, offset, lo, hi) - 1
        if i < lo or offset >= self._coff[i] + self._size[i]:
            return -1
        return i

    def span(self, file_id: int) -> tuple[int, int]:
        """``[start, end)`` rows of ``file_id`` (empty, ``start == end``, if it has none)."""
        lo = bisect_left(self._fid, file_id)
        return lo, bisect_right(self._fid, file_id, lo)

    def cover(self, file_id: int, offset: int, length: int) -> tuple[int, int]:
        """``[start, end)`` rows of ``file_id`` that overlap ``[offset, offset + length)``."""
        lo, hi = self.span(file_id)
        end = min(offset + length, _INT64_MAX)
        offset = max(offset, 0)
        if lo == hi or end <= offset:
            return lo, lo
        first = max(bisect_right(self._coff, offset, lo, hi) - 1, lo)
        if offset >= self._coff[first] + self._size[first]:
            first += 1
        last = bisect_left(self._coff, end, first, hi)
        while last > first and self._size[last - 1] == 0:  # empty rows overlap nothing
            last -= 1
        return (first, last) if first < last else (lo, lo)

    def row(self, i: int) -> tuple[int, int, int, int, bytes]:
        """``(chunk_offset, comp_offset, inner_offset, size, digest32)`` of row ``i``."""
        if not 0 <= i < len(self._fid):
            raise IndexError(f"chunk row {i} out of range [0, {len(self._fid)})")
        return (
            self._coff[i],
            self._comp[i],
            self._inner[i],
            self._size[i],
            self._digests[32 * i : 32 * i + 32],
        )

    def file_id(self, i: int) -> int:
        """File id of row ``i``."""
        if not 0 <= i < len(self._fid):
            raise IndexError(f"chunk row {i} out of range [0, {len(self._fid)})")
        return self._fid[i]

    def next_comp_offset(self, i: int, blob_end: int) -> int:
        """End of row ``i``'s member: the next larger ``comp_offset`` of any row, else
        ``blob_end`` (pass the TOC's offset: the last member ends where the TOC starts)."""
        if not 0 <= i < len(self._fid):
            raise IndexError(f"chunk row {i} out of range [0, {len(self._fid)})")
        j = bisect_right(self._uniq, self._comp[i])
        return self._uniq[j] if j < len(self._uniq) else blob_end

    def shares_member(self, i: int) -> bool:
        """True if another row has the same ``comp_offset`` (the member is not exclusive)."""
        if not 0 <= i < len(self._fid):
            raise IndexError(f"chunk row {i} out of range [0, {len(self._fid)})")
        return self._shared[i] == 1

    @property
    def nbytes(self) -> int:
        """Bytes held by the table's arrays."""
        return (
            sum(
                sys.getsizeof(a)
                for a in (self._fid, self._coff, self._comp, self._inner, self._size, self._uniq)
            )
            + sys.getsizeof(self._digests)
            + sys.getsizeof(self._shared)
        )


def _check_name(i: int, name: bytes) -> None:
    if not name:
        raise TOCError(f"name table row {i}: empty name")
    if name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise UnsafePathError(f"name table row {i}: {name!r} is not a plain file name")


class NameTable:
    """Directory entries: ``(parent, name) -> row``, and each parent's rows sorted by name."""

    def __init__(self, parents: Sequence[int], names: Sequence[bytes]) -> None:
        """Build the table; raise ``TOCError`` on bad input.

        ``parents[i]`` (an int >= -1) and ``names[i]`` (bytes) describe row ``i``. Rejected:
        columns of different length, a parent below -1, a name that is not bytes, a
        duplicate ``(parent, name)``, and (``UnsafePathError``) for rows with a parent, a
        name that is empty, ``.``, ``..`` or contains ``/`` or NUL.
        """
        par = parents if isinstance(parents, array) and parents.typecode == "q" else None
        if par is None:
            par = array("q", parents)
        n = len(par)
        if len(names) != n:
            raise TOCError(f"name table columns differ in length: {n} parents, {len(names)} names")
        for i in range(n):
            if type(names[i]) is not bytes:
                raise TOCError(
                    f"name table row {i}: name must be bytes, not {type(names[i]).__name__}"
                )
        for i in range(n):
            p = par[i]
            if p < -1:
                raise TOCError(f"name table row {i}: parent {p} is not an id or -1")
            if p != -1:
                _check_name(i, names[i])
        index: dict[tuple[int, bytes], int] = {}
        for i in range(n):
            p = par[i]
            if p == -1:
                continue
            key = (p, names[i])
            if key in index:
                raise TOCError(
                    f"name table row {i}: duplicate entry {names[i]!r} in parent {p} "
                    f"(also row {index[key]})"
                )
            index[key] = i
        self._index = index
        self._parents = par
        self._names = list(names)
        order = sorted(index.items())  # by (parent, name): each parent's children by name
        self._kids_parent = array("q", (k[0] for k, _ in order))
        self._kids = array("q", (i for _, i in order))
        self._n = n

    def __len__(self) -> int:
        return self._n

    def child(self, parent: int, name: bytes) -> int:
        """Row of ``name`` in ``parent``, or -1."""
        if type(name) is not bytes:
            raise TypeError(f"name must be bytes, not {type(name).__name__}")
        return self._index.get((parent, name), -1)

    def children(self, parent: int) -> list[int]:
        """Rows whose parent is ``parent``, sorted by name (bytewise)."""
        lo = bisect_left(self._kids_parent, parent)
        hi = bisect_right(self._kids_parent, parent, lo)
        return self._kids[lo:hi].tolist()

    def parent(self, i: int) -> int:
        """Parent id of row ``i``."""
        if not 0 <= i < self._n:
            raise IndexError(f"name row {i} out of range [0, {self._n})")
        return self._parents[i]

    def name(self, i: int) -> bytes:
        """Name of row ``i``."""
        if not 0 <= i < self._n:
            raise IndexError(f"name row {i} out of range [0, {self._n})")
        return self._names[i]

    @property
    def nbytes(self) -> int:
        """Bytes held by the table (the dict, its keys, and the arrays)."""
        total = sys.getsizeof(self._index)
        for key in self._index:
            total += sys.getsizeof(key) + sys.getsizeof(key[1])
        return (
            total
            + sys.getsizeof(self._names)
            + sum(sys.getsizeof(a) for a in (self._parents, self._kids_parent, self._kids))
        )
