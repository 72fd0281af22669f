"""A layer's chunk index: which compressed bytes hold which chunk, and each chunk's cache key.

A *row* is one chunk of the TOC's chunk table. A *member* is one compressed unit of the
blob (a gzip member / zstd frame) starting at a distinct TOC ``offset``; it spans up to
the next member (the last one up to the TOC). Several rows may share a member
(``innerOffset``); members tile the blob's payload, so consecutive members make one
contiguous byte range.

`ChunkIndex` also answers, for the FUSE side (passthrough, the state file, metrics),
which chunks of a file are verified on disk (`ChunkFile` records) and how many
compressed bytes of the layer the disk cache holds (`FetchedSize`, kept as a counter).
"""

from __future__ import annotations

import hashlib
from array import array
from typing import NamedTuple

from stargz.estargz.reader import Reader
from stargz.fs.cache import MERGED_PREFIX, DiskCache

_ZERO_DIGEST = bytes(32)


class ChunkKeys:
    """The disk/memory cache key of each chunk row, made when asked for.

    ``keys[r]`` is the chunk's sha256 in hex (the cache is content-addressed), or
    ``u-<layer hex>-[<scope hash>-]<row>`` for a chunk without a digest (or when not
    verifying): such chunks are trusted only as far as their source is, so ``scope`` (the
    source repository) keeps them apart from the same layer's read elsewhere. A list of
    the strings cost ~120 bytes a row for the life of the mount; this holds only the 32
    digest bytes a row that the reader already has.
    """

    __slots__ = ("_digests", "_n", "_verify", "_unverified")

    def __init__(
        self, digests: bytes, n: int, verify: bool, layer_digest: str, scope: str = ""
    ) -> None:
        self._digests = digests
        self._n = n
        self._verify = verify
        self._unverified = f"u-{layer_digest.partition(':')[2]}-"
        if scope:
            self._unverified += hashlib.sha256(scope.encode()).hexdigest()[:16] + "-"

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, r: int) -> str:
        if r < 0:
            r += self._n
        if not 0 <= r < self._n:
            raise IndexError("chunk row out of range")
        if self._verify:
            d = self._digests[32 * r : 32 * r + 32]
            if d != _ZERO_DIGEST:
                return d.hex()
        return f"{self._unverified}{r}"


class ChunkFile(NamedTuple):
    """One chunk of a file, verified in the disk cache: its cache file and where it goes."""

    path: str
    offset: int  # in the file
    size: int


class ChunkIndex:
    """Members (distinct compressed offsets), rows per member, and a cache key per row.

    Built once per layer in a worker thread (a few passes over the chunk table). ``scope``
    names where unverified chunks come from (see `ChunkKeys`).
    """

    def __init__(self, reader: Reader, digest: str, scope: str = "") -> None:
        coff, comp, size = reader.chunk_off, reader.chunk_comp, reader.chunk_size
        n = len(comp)
        keys = ChunkKeys(reader.chunk_digests, n, reader.verify, digest, scope)
        order = sorted(range(n), key=comp.__getitem__)
        m_start = array("q")
        m_first = array("q")  # index into m_rows of each member's first row
        row_member = array("q", bytes(8 * n))
        for i, r in enumerate(order):
            c = comp[r]
            if not m_start or m_start[-1] != c:
                m_start.append(c)
                m_first.append(i)
            row_member[r] = len(m_start) - 1
        m_first.append(n)
        m_end = array("q", m_start[1:])
        m_end.append(reader.footer.toc_offset)
        self.chunks = reader.chunks
        self.verify = reader.verify
        self.toc_offset = reader.footer.toc_offset
        self.row_coff, self.row_comp, self.row_size, self.keys = coff, comp, size, keys
        self.row_member, self.m_start, self.m_end = row_member, m_start, m_end
        self.m_first, self.m_rows = m_first, array("q", order)
        self.n_members = len(m_start)
        self.digests = reader.chunk_digests
        self._merged_prefix = f"{MERGED_PREFIX}{digest.partition(':')[2]}-"
        self._merged_unverified = keys._unverified[2:]  # "<layer hex>-[<scope hash>-]"
        #: digest -> every row with it, for digests that more than one row has (equal
        #: chunks share one cache file: committing one commits them all).
        self.dups: dict[bytes, list[int]] = _duplicates(reader.chunk_digests, n, reader.verify)

    def merged_key(self, node_id: int) -> str:
        """The disk cache key of the file's merged passthrough copy: layer digest + node,
        so a restarted daemon finds it; with the source's scope when a chunk of the file
        has no digest (such bytes are only as good as the source they came from)."""
        lo, hi = self.chunks.span(node_id)
        d = self.digests
        if self.verify and all(d[32 * r : 32 * r + 32] != _ZERO_DIGEST for r in range(lo, hi)):
            return f"{self._merged_prefix}{node_id}"
        return f"{MERGED_PREFIX}{self._merged_unverified}u{node_id}"

    def member_rows(self, m: int) -> array:
        return self.m_rows[self.m_first[m] : self.m_first[m + 1]]

    def member_on_disk(self, m: int, disk: DiskCache) -> bool:
        keys = self.keys
        return all(keys[r] in disk for r in self.member_rows(m))

    def verified_files(self, node_id: int, file_size: int, disk: DiskCache) -> list[ChunkFile]:
        """The chunk files of a file in order, if every chunk is verified on disk, else []."""
        if file_size <= 0:
            return []
        lo, hi = self.chunks.cover(node_id, 0, file_size)
        out: list[ChunkFile] = []
        expect = 0
        for r in range(lo, hi):
            key = self.keys[r]
            n = self.row_size[r]
            if self.row_coff[r] != expect or disk.size_of(key) != n:
                return []
            if not disk.is_verified(key):  # (found at start and not checked yet)
                return []
            out.append(ChunkFile(disk.path(key), expect, n))
            expect += n
        return out if expect == file_size else []


def _duplicates(digests: bytes, n: int, verify: bool) -> dict[bytes, list[int]]:
    if not verify:
        return {}
    first: dict[bytes, int] = {}
    dups: dict[bytes, list[int]] = {}
    for r in range(n):
        d = digests[32 * r : 32 * r + 32]
        if d == _ZERO_DIGEST:
            continue
        f = first.setdefault(d, r)
        if f != r:
            dups.setdefault(d, [f]).append(r)
    return dups


class FetchedSize:
    """Compressed bytes of a layer whose chunks are all in the disk cache, as a counter.

    A member counts once all its rows' chunks are on disk. The layer tells it about
    chunks it commits (`committed`) and members it finds on disk (`seen`); a chunk can
    also arrive through another layer (the cache is shared and content-addressed) or
    leave it (eviction, damage) without this layer knowing. Both change the cache's
    ``(generation, commits)`` version: when it moved by more than this layer's own
    commits, the next `value` recounts once. Without such changes `value` is O(1).
    """

    def __init__(self, index: ChunkIndex, disk: DiskCache, blob_size: int) -> None:
        self._index = index
        self._disk = disk
        self._size = blob_size
        self._counted = bytearray(index.n_members)
        self._total = 0
        self._n = 0  # members counted
        self._version = (-1, -1)  # cache version the counter is exact for
        self._own = 0  # commits made by this layer since _version

    def value(self) -> int:
        disk = self._disk
        gen, commits = disk.generation, disk.commits
        if gen != self._version[0] or commits != self._version[1] + self._own:
            self._recount()
        if self._n == self._index.n_members:
            return self._size  # (bytes before the first member count as well)
        return min(self._size, self._total + self._size - self._index.toc_offset)

    def committed(self, rows: list[int]) -> None:
        """This layer committed the chunks of ``rows`` to the disk cache just now."""
        idx, disk = self._index, self._disk
        self._own += len(rows)
        dups = idx.dups
        for r in rows:
            same = dups.get(idx.digests[32 * r : 32 * r + 32]) if dups else None
            for rr in same or (r,):
                m = idx.row_member[rr]
                if not self._counted[m] and idx.member_on_disk(m, disk):
                    self._counted[m] = 1
                    self._n += 1
                    self._total += idx.m_end[m] - idx.m_start[m]

    def _recount(self) -> None:
        idx, disk = self._index, self._disk
        self._version = (disk.generation, disk.commits)
        self._own = 0
        total = n = 0
        counted = self._counted
        for m in range(idx.n_members):
            if idx.member_on_disk(m, disk):
                counted[m] = 1
                n += 1
                total += idx.m_end[m] - idx.m_start[m]
            else:
                counted[m] = 0
        self._total, self._n = total, n


__all__ = ["ChunkFile", "ChunkIndex", "ChunkKeys", "FetchedSize"]
