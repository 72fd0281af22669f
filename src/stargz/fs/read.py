"""The read path of a layer: a file range -> the chunks covering it -> their bytes.

::

    chunks covering [off, off+size)        native ChunkTable.cover (bisection)
    -> memory LRU (decompressed chunks)    hit: slice
    -> in-flight fetch of the same chunk   await it (one fetch per chunk at a time)
    -> disk cache (content-addressed)      hit: pread just the bytes asked for (a file
                                           found at start: checked once first, see
                                           `Fetcher.start_disk_verify`)
    -> miss: the fetch engine              (`stargz.fs.fetch`): fetch, decode, verify
                                          (a chunk that fails verification: fetched
                                          once more, then EIO)

`read_now` answers what needs no waiting (one chunk, in memory or verified on disk)
without a coroutine; everything else goes to the one slow path, `read_later`. Asked for
``ranges``, `read_now` answers a verified disk hit with the file range itself
(`stargz.fuse.protocol.FileRanges`), which the FUSE session splices into the device
without reading it; its ``fallback`` reads the bytes as before.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Coroutine
from concurrent.futures import Executor
from typing import Any

from stargz.errors import Unavailable
from stargz.estargz.reader import Reader
from stargz.fs.cache import DiskCache, MemoryLRU
from stargz.fs.chunks import ChunkIndex
from stargz.fs.delivery import ChunkVerifyError
from stargz.fs.fetch import Fetcher, LayerClosed
from stargz.fs.metrics import LayerMetrics
from stargz.fuse.protocol import FileRanges

#: Disk-cache reads up to this size run on the event loop: a page-cache pread of 1 MiB costs
#: ~0.1-0.3 ms, less than a worker-thread hop and its GIL handoffs (measured: bench_fs.py).
INLINE_PREAD_MAX = 1 << 20
#: A read of a cached chunk at least this big is the kernel's read-ahead of a sequential
#: reader: when it passes the middle of its chunk, the next chunk's file is read ahead too
#: (each chunk is its own cache file, and the disk's read-ahead stops at a file's end).
SEQUENTIAL_READ_MIN = 128 << 10
#: A read served as file ranges spans at most this many chunk files: each range holds an
#: fd of the cache's fd LRU (at least 128), which must not close one of this read's fds
#: while it takes the next one.
MAX_RANGES = 32
_MISSING = object()


class ReadPath:
    """Serves file ranges of one layer from its caches, asking ``fetcher`` for misses."""

    def __init__(
        self,
        digest: str,
        reader: Reader,
        index: ChunkIndex,
        fetcher: Fetcher,
        *,
        memory: MemoryLRU,
        disk: DiskCache,
        executor: Executor,
        metrics: LayerMetrics,
        read_ahead_next_chunk: bool,
    ) -> None:
        self.digest = digest
        self.nodes = reader.nodes
        self.chunks = reader.chunks
        self.keys, self.row_coff, self.row_size = index.keys, index.row_coff, index.row_size
        self.verify = index.verify
        self.fetcher = fetcher
        self.inflight = fetcher.inflight
        self.memory = memory
        self.disk = disk
        self.executor = executor
        self.metrics = metrics
        self.read_ahead = read_ahead_next_chunk
        self.closed = False
        self._loop = asyncio.get_running_loop()

    def read_now(
        self, node_id: int, off: int, size: int, ranges: bool = False
    ) -> bytes | FileRanges | None:
        """The answer when it needs no waiting, else None: one chunk in memory or verified
        on disk (with ``ranges``: also several chunks, all verified on disk). The FUSE
        session answers such reads without a coroutine. ``ranges``: chunks verified on
        disk are answered with their file ranges, not their bytes."""
        if self.closed:
            raise LayerClosed(f"layer {self.digest} is unmounted")
        fsize = self.nodes[node_id].size
        if off >= fsize or size <= 0:
            return b""
        if off + size > fsize:
            size = fsize - off
        lo, hi = self.chunks.cover(node_id, off, size)
        if hi != lo + 1:
            return self._ranges(node_id, off, size, lo, hi) if ranges else None
        key = self.keys[lo]
        a = off - self.row_coff[lo]
        b = a + size
        data = self.memory.get(key)
        m = self.metrics
        if data is not None:
            m.memory_hits += 1
            out = data[a:b]
        else:
            disk = self.disk
            if (
                b - a > INLINE_PREAD_MAX
                or key in self.inflight
                or not disk.is_verified(key)
                or disk.size_of(key) != self.row_size[lo]
            ):
                return None
            if ranges:
                try:
                    fd = disk.fd(key)
                except OSError:
                    return None
                copy = functools.partial(self._copy, node_id, off, size, ((key, a, size),))
                out = FileRanges(((fd, a, size),), size, copy)
            else:
                try:
                    out = disk.pread(key, a, b - a)
                except OSError:
                    return None
                if len(out) != b - a:
                    return None
            m.disk_hits += 1
            disk.touch(key)
            self._read_ahead(node_id, lo, a, b)
        m.reads += 1
        m.bytes_served += b - a
        return out

    def _ranges(self, node_id: int, off: int, size: int, lo: int, hi: int) -> FileRanges | None:
        """`read_now` of rows ``lo:hi`` as file ranges, if every one is verified on disk."""
        disk, inflight, keys = self.disk, self.inflight, self.keys
        row_coff, row_size = self.row_coff, self.row_size
        if size > INLINE_PREAD_MAX or hi - lo > MAX_RANGES:
            return None
        end = off + size
        parts = []
        pieces = []
        for row in range(lo, hi):
            key = keys[row]
            if key in inflight or not disk.is_verified(key) or disk.size_of(key) != row_size[row]:
                return None
            coff = row_coff[row]
            a = off - coff if off > coff else 0
            b = end - coff if end - coff < row_size[row] else row_size[row]
            try:
                fd = disk.fd(key)
            except OSError:
                return None
            parts.append((fd, a, b - a))
            pieces.append((key, a, b - a))
        for key, _, _ in pieces:
            disk.touch(key)
        m = self.metrics
        m.disk_hits += hi - lo
        m.reads += 1
        m.bytes_served += size
        self._read_ahead(node_id, hi - 1, pieces[-1][1], pieces[-1][1] + pieces[-1][2])
        copy = functools.partial(self._copy, node_id, off, size, tuple(pieces))
        return FileRanges(tuple(parts), size, copy)

    def _read_ahead(self, node_id: int, row: int, a: int, b: int) -> None:
        """A sequential reader past the middle of cached chunk ``row``: have the next
        chunk's file read ahead."""
        if b - a >= SEQUENTIAL_READ_MIN and self.read_ahead:
            half = self.row_size[row] >> 1
            if a < half <= b and row + 1 < self.chunks.span(node_id)[1]:
                nxt = self.keys[row + 1]
                if self.disk.is_verified(nxt):
                    self.disk.willneed(nxt)

    def _copy(
        self, node_id: int, off: int, size: int, pieces: tuple[tuple[str, int, int], ...]
    ) -> bytes | Coroutine[Any, Any, bytes]:
        """A `FileRanges` answer of `read_now` as bytes (splicing it did not work): the
        ``(key, offset, length)`` pieces read from their files; a file found short is
        dropped and fetched again (`read_later`)."""
        out = []
        for key, a, n in pieces:
            try:
                data = self.disk.pread(key, a, n)
            except OSError:
                data = b""
            if len(data) != n:
                return self.read_later(node_id, off, size)
            out.append(data)
        return out[0] if len(out) == 1 else b"".join(out)

    async def read(self, node_id: int, off: int, size: int) -> bytes:
        """Up to ``size`` bytes of file ``node_id`` from ``off`` (fewer at end of file).

        Raises ChunkVerifyError (a chunk failed verification), Unavailable (the source
        failed), LayerClosed.
        """
        out = self.read_now(node_id, off, size)
        if out is not None:
            return out
        return await self.read_later(node_id, off, size)

    async def read_later(self, node_id: int, off: int, size: int) -> bytes:
        """`read` for a range `read_now` could not answer."""
        if self.closed:
            raise LayerClosed(f"layer {self.digest} is unmounted")
        fsize = self.nodes[node_id].size
        if off >= fsize or size <= 0:
            return b""
        if off + size > fsize:
            size = fsize - off
        lo, hi = self.chunks.cover(node_id, off, size)
        plan: list[list[Any]] = []
        missing: list[int] = []
        end = off + size
        row_size, keys, row_coff = self.row_size, self.keys, self.row_coff
        for row in range(lo, hi):
            coff = row_coff[row]
            key = keys[row]
            a = off - coff if off > coff else 0
            b = end - coff if end - coff < row_size[row] else row_size[row]
            got = self._lookup(row, key, True)
            if got is _MISSING:
                missing.append(row)
            plan.append([row, key, a, b, got])
        if missing:
            self.metrics.cache_misses += len(missing)
            self.fetcher.fetch_rows(missing, "demand")
            for p in plan:
                if p[4] is _MISSING:
                    p[4] = self._lookup(p[0], p[1], False)
        parts = []
        for row, key, a, b, got in plan:
            parts.append(await self._slice(row, key, a, b, got))
        self.metrics.reads += 1
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        self.metrics.bytes_served += len(out)
        return out

    def _lookup(self, row: int, key: str, count: bool) -> Any:
        """bytes (memory), a future (in flight), None (verified on disk) or _MISSING."""
        m = self.metrics
        data = self.memory.get(key)
        if data is not None:
            if count:
                m.memory_hits += 1
            return data
        fut = self.inflight.get(key)
        if fut is not None:
            if count:
                m.inflight_hits += 1
            return fut
        size = self.disk.size_of(key)
        if size is not None:
            if size != self.row_size[row]:
                self.disk.discard(key)
                m.disk_cache_rejects += 1
                return _MISSING
            if self.disk.is_verified(key):
                if count:
                    m.disk_hits += 1
                self.disk.touch(key)
                return None
            if count:
                m.disk_hits += 1
            return self.fetcher.start_disk_verify(row, key)
        return _MISSING

    async def _slice(self, row: int, key: str, a: int, b: int, got: Any) -> bytes:
        fetcher = self.fetcher
        refetched = False
        for _ in range(3):
            if isinstance(got, bytes):
                return got[a:b]
            if isinstance(got, asyncio.Future):
                if fetcher.is_mine(got):
                    if not got.done():
                        fetcher.overtake(row)  # (if queued behind other prefetch pieces)
                    try:
                        data = await asyncio.shield(got)
                    except ChunkVerifyError:
                        # bytes damaged on the way (a flipped bit, a cache in between) were
                        # never served nor cached: fetch them once more before the EIO
                        if refetched or fetcher.closed:
                            raise
                        refetched = True
                        got = self._refetch(row, key)
                        continue
                    return data[a:b]
                # another layer's fetch of the same chunk: wait through a future of ours
                # (our close answers it), and if theirs fails, fetch with our own blob
                try:
                    data = await fetcher.follow(got)
                    return data[a:b]
                except Exception:
                    if fetcher.closed:
                        raise
            elif got is None:
                try:
                    if b - a <= INLINE_PREAD_MAX:
                        data = self.disk.pread(key, a, b - a)
                    else:
                        data = await self._loop.run_in_executor(
                            self.executor, self.disk.pread_fresh, key, a, b - a
                        )
                    if len(data) == b - a:
                        return data
                except OSError:
                    pass
                self.disk.discard(key)
                self.metrics.disk_cache_rejects += 1
            # gone from the cache meanwhile, or a shared fetch failed: fetch it again
            got = self._refetch(row, key)
        raise Unavailable(f"chunk {key} of layer {self.digest} keeps disappearing from the cache")

    def _refetch(self, row: int, key: str) -> Any:
        self.metrics.cache_misses += 1
        got = self._lookup(row, key, False)
        if got is _MISSING:
            self.fetcher.fetch_rows([row], "demand")
            got = self._lookup(row, key, False)
        return got


__all__ = ["INLINE_PREAD_MAX", "ReadPath", "SEQUENTIAL_READ_MIN"]
