"""One opened layer: its TOC index, and the path from a file read to verified bytes.

The read path (DESIGN "flow of one read")::

    chunks covering [off, off+size)        native ChunkTable.cover (bisection)
    -> memory LRU (decompressed chunks)    hit: slice
    -> in-flight fetch of the same chunk   await it (one fetch per chunk, ever at a time)
    -> disk cache (content-addressed)      hit: pread just the bytes asked for
    -> miss: fetch                         neighbouring missing members coalesced into one
                                           range, small ranges widened to [blob] chunk_size
    -> decode + verify (native, no GIL)    in a small thread pool, off the event loop
    -> memory LRU + disk cache             a chunk that fails verification is never cached
                                           or returned: the read fails (EIO), and the
                                           next read fetches it again

Vocabulary: a *row* is one chunk of the TOC's chunk table. A *member* is one compressed
unit of the blob (a gzip member / zstd frame) starting at a distinct TOC ``offset``; it
spans up to the next member (the last one up to the TOC). Several rows may share a member
(``innerOffset``); members tile the blob's payload, so consecutive members make one
contiguous byte range.

Prefetch fetches the members before the prefetch offset (the ``.prefetch.landmark``) in
one request; background fetch walks the rest at low priority (see
:mod:`stargz.fs.scheduler`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import os
import time
from array import array
from bisect import bisect_right
from collections.abc import Iterable
from concurrent.futures import Executor
from typing import Any

from stargz.errors import ChunkError, DigestMismatch, StargzError, Unavailable, VerificationError
from stargz.estargz import codec
from stargz.estargz.footer import parse_footer
from stargz.estargz.reader import Reader
from stargz.fs import memory
from stargz.fs.cache import DiskCache, MemoryLRU
from stargz.fs.headstart import HeadStartBlob, landmark_offset
from stargz.fs.metrics import LayerMetrics
from stargz.fs.options import FsOptions
from stargz.fs.scheduler import Scheduler
from stargz.fs.source import Blob

log = logging.getLogger("stargz.fs")

#: First read of a blob: its last bytes, which usually hold the footer and the whole TOC.
TAIL_FETCH_SIZE = 64 << 10
#: Disk-cache reads up to this size run on the event loop: a page-cache pread of 1 MiB costs
#: ~0.1-0.3 ms, less than a worker-thread hop and its GIL handoffs (measured: bench_fs.py).
INLINE_PREAD_MAX = 1 << 20
#: A read of a cached chunk at least this big is the kernel's read-ahead of a sequential
#: reader: when it passes the middle of its chunk, the next chunk's file is read ahead too
#: (each chunk is its own cache file, and the disk's read-ahead stops at a file's end).
SEQUENTIAL_READ_MIN = 128 << 10
#: (A switch for A/B runs: benchmarks/bench_read_ahead.py.)
READ_AHEAD_NEXT_CHUNK = True
#: A prefetch is fetched in pieces of this many bytes (cut at member boundaries), at most
#: PREFETCH_PARALLEL at a time, when ``prefetch_chunk_size`` is 0 (Go: one request): the
#: first pieces decode while the next download. Measured on the HelloBench gcc image
#: (23 MB prefetch, 10 ms RTT, 200 Mbit/s): create 1.15 -> 1.05 s.
PREFETCH_PIECE = 2 << 20
PREFETCH_PARALLEL = 4
#: A prefetch up to this size uses one connection, its pieces one after the other: extra
#: connections start in TCP slow start and add nothing to a link one flow fills; with 4,
#: 4 of 12 python prefetches (5 MB, 10 ms RTT, 200 Mbit/s) took +0.1 s, with 1 none did
#: (0.24-0.26 s). Bigger prefetches keep 4 (gcc, 23 MB: 1.16 s with 1, 1.04 with 4).
PREFETCH_ONE_FLOW_MAX = 8 << 20
#: At most this many bytes of a prefetch start downloading while the TOC is parsed (see
#: stargz.fs.headstart), in the pieces and with the parallelism of the prefetch itself.
#: ``STARGZ_HEAD_START=0`` in the daemon's environment turns it off (for A/B measurements:
#: benchmarks/bench_hellobench.py mode ``ours-opt-nohs``).
HEAD_START_MAX = 64 << 20 if os.environ.get("STARGZ_HEAD_START") != "0" else 0
#: Decoded bytes of this layer that may wait for the cache writer before background fetch
#: pauses. Without it the download outran the (single, niced) writer thread: 470 MB RSS
#: while background-fetching a 144 MB layer on loopback (benchmarks/bench_daemon_cost.py).
WRITE_BACKLOG_MAX = 16 << 20
#: Compressed bytes decoded per worker-thread job (bigger fetches are split across threads).
DECODE_BATCH_BYTES = 1 << 20
#: On-demand fetches up to this many compressed bytes are decoded on the event loop.
INLINE_DECODE_MAX = 64 << 10
_MISSING = object()
_ZERO_DIGEST = bytes(32)


class LayerClosed(Unavailable):
    """The layer was unmounted while a read waited for it."""


class ChunkVerifyError(VerificationError):
    """A chunk failed to decode or did not match its chunkDigest; it was not served."""


def _consume(fut: asyncio.Future[Any]) -> None:
    # A failed fetch that nobody awaits any more must not be logged as "never retrieved".
    if not fut.cancelled():
        fut.exception()


@functools.lru_cache(maxsize=4096)
def _parse_modtime(value: str) -> int:
    # cached: a layer has few distinct modtimes (the TOC builder shares equal strings),
    # and every LOOKUP / READDIRPLUS answer needs one
    if not value:
        return 0
    try:
        t = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return 0
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.UTC)
    delta = t - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


async def fetch_tail(blob: Blob, digest: str, disk: DiskCache | None, loop_executor: Executor):
    """``(start, bytes[start:size], fetched)``: the blob from the TOC's start to its end.

    ``fetched`` is how many bytes came from the blob (0 when the disk cache had them).
    The blob's last bytes that its opening already fetched (``take_tail()``, see
    :class:`~stargz.fs.source.Blob`) are used instead of asking for them again.
    """
    loop = asyncio.get_running_loop()
    size = blob.size
    take = getattr(blob, "take_tail", None)
    probed = take() if take is not None else None
    if disk is not None:
        cached = await loop.run_in_executor(loop_executor, disk.read_tail, digest, size)
        if cached is not None:
            return cached[0], cached[1], 0
    # a probed tail must end the blob and hold a whole footer (51 bytes at most)
    if (
        probed is not None
        and probed[0] + len(probed[1]) == size
        and (probed[0] == 0 or len(probed[1]) >= 64)
    ):
        start, tail = probed
    else:
        tail_len = min(size, TAIL_FETCH_SIZE)
        start = size - tail_len
        (tail,) = await blob.read_ranges([(start, tail_len)])
    footer = parse_footer(tail, size)
    if footer.toc_offset < start:
        (head,) = await blob.read_ranges([(footer.toc_offset, start - footer.toc_offset)])
        return footer.toc_offset, head + tail, len(head) + len(tail)
    return footer.toc_offset, tail[footer.toc_offset - start :], len(tail)


class ChunkKeys:
    """The disk/memory cache key of each chunk row, made when asked for.

    ``keys[r]`` is the chunk's sha256 in hex (the cache is content-addressed), or
    ``u-<layer hex>-<row>`` for a chunk without a digest (or when not verifying). A list of
    the strings cost ~120 bytes a row for the life of the mount; this holds only the 32
    digest bytes a row that the reader already has.
    """

    __slots__ = ("_digests", "_n", "_verify", "_unverified")

    def __init__(self, digests: bytes, n: int, verify: bool, layer_digest: str) -> None:
        self._digests = digests
        self._n = n
        self._verify = verify
        self._unverified = f"u-{layer_digest.partition(':')[2]}-"

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


class ChunkIndex:
    """Members (distinct compressed offsets), rows per member, and a cache key per row.

    Built once per layer in a worker thread (a few passes over the chunk table).
    """

    def __init__(self, reader: Reader, digest: str) -> None:
        coff, comp, size = reader.chunk_off, reader.chunk_comp, reader.chunk_size
        n = len(comp)
        keys = ChunkKeys(reader.chunk_digests, n, reader.verify, digest)
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
        self.row_coff, self.row_comp, self.row_size, self.keys = coff, comp, size, keys
        self.row_member, self.m_start, self.m_end = row_member, m_start, m_end
        self.m_first, self.m_rows = m_first, array("q", order)


class Layer:
    """An opened blob plus everything needed to serve its files' bytes.

    Build with :meth:`open`. ``reader`` is the format-level view (nodes, TOC, chunk
    table); ``metrics`` counts what it cost. Coroutines run on the event loop that opened
    the layer.
    """

    def __init__(
        self,
        digest: str,
        blob: Blob,
        reader: Reader,
        index: ChunkIndex,
        *,
        options: FsOptions,
        memory: MemoryLRU,
        disk: DiskCache,
        executor: Executor,
        scheduler: Scheduler,
        tail_bytes: int,
        inflight: dict[str, asyncio.Future[bytes]] | None = None,
        writer: Executor | None = None,
    ) -> None:
        self.digest = digest
        self.blob = blob
        self.reader = reader
        self.options = options
        self.memory = memory
        self.disk = disk
        self.executor = executor
        #: Cache writes get their own thread(s) so decodes never queue behind them.
        self.writer = writer or executor
        self.scheduler = scheduler
        self.metrics = LayerMetrics()
        self.size = blob.size
        self.tail_bytes = tail_bytes
        self.chunks = reader.chunks
        #: Chunk key -> future of its bytes, while being fetched. Shared by all layers of a
        #: filesystem, so one chunk is fetched once even when two layers want it at once.
        self.inflight: dict[str, asyncio.Future[bytes]] = {} if inflight is None else inflight
        self._owned: set[str] = set()  # the keys of `inflight` this layer fetches
        self.prefetch_done = asyncio.Event()
        self.prefetch_size = 0
        self.closed = False
        self.last_check = time.monotonic()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._complete_gen = -1  # disk cache generation at which all chunks were there
        self._loop = asyncio.get_running_loop()
        #: Decoded bytes handed to the cache writer and not written yet; background fetch
        #: waits for `_backlog_ok` (backlog <= WRITE_BACKLOG_MAX) before each request.
        self._backlog = 0
        self._backlog_ok = asyncio.Event()
        self._backlog_ok.set()
        self.row_coff, self.row_comp = index.row_coff, index.row_comp
        self.row_size, self.keys = index.row_size, index.keys
        self.row_member, self.m_start, self.m_end = index.row_member, index.m_start, index.m_end
        self.m_first, self.m_rows = index.m_first, index.m_rows
        self.n_members = len(index.m_start)
        self.verify_keys = reader.verify

    # --- opening -------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        digest: str,
        blob: Blob,
        *,
        toc_digest: str | None,
        verify: bool,
        options: FsOptions,
        memory: MemoryLRU,
        disk: DiskCache,
        executor: Executor,
        scheduler: Scheduler,
        inflight: dict[str, asyncio.Future[bytes]] | None = None,
        writer: Executor | None = None,
    ) -> Layer:
        """Fetch the footer and TOC (or take them from the disk cache), verify, index.

        Raises FooterError/TOCError for a blob that is not eStargz, DigestMismatch when
        the TOC does not hash to ``toc_digest``.
        """
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        start, data, fetched = await fetch_tail(blob, digest, disk, executor)
        t_fetched = time.monotonic()
        size = blob.size
        # A layer seen for the first time (its TOC came from the source, so its chunks are
        # not cached either) starts downloading its prefetch range during the parse.
        head: list[HeadStartBlob] = []
        hint: list[int] = []

        def start_head() -> None:
            if hint and not head:
                n = min(hint[0], HEAD_START_MAX)
                parallel = 1 if n <= PREFETCH_ONE_FLOW_MAX else PREFETCH_PARALLEL
                head.append(HeadStartBlob(blob, n, PREFETCH_PIECE, parallel))

        def on_toc_json(toc_json: bytes) -> None:  # in the executor thread
            off = landmark_offset(toc_json)
            if off:
                hint.append(off)
                loop.call_soon_threadsafe(start_head)

        head_start = on_toc_json if fetched and not options.noprefetch and HEAD_START_MAX else None

        def build(start: int, data: bytes, on_toc_json: Any = None) -> Reader:
            # The reader keeps its read_at; the tail (the whole compressed TOC) must not
            # stay alive with it: the layer reads chunks through the blob, never the reader.
            held = [data]

            def read_at(off: int, n: int) -> bytes:
                if not held:
                    raise ChunkError("the layer's reader holds no blob bytes once opened")
                if off < start or off + n > size:
                    raise ChunkError(
                        f"read [{off}, +{n}) outside the fetched tail [{start}, {size})"
                    )
                return held[0][off - start : off - start + n]

            try:
                return Reader(
                    read_at,
                    size,
                    toc_digest=toc_digest,
                    verify=verify,
                    tail_size=size - start,
                    keep_toc=False,
                    on_toc_json=on_toc_json,
                )
            finally:
                held.clear()

        try:
            try:
                reader = await loop.run_in_executor(executor, build, start, data, head_start)
            except (StargzError, ValueError):
                if fetched:
                    raise
                # a stale or damaged cached tail: forget it and go to the source
                start, data, fetched = await fetch_tail(blob, digest, None, executor)
                reader = await loop.run_in_executor(executor, build, start, data)
            start_head()  # (normally done already, by the callback the parse queued)
            if fetched:
                try:
                    await loop.run_in_executor(executor, disk.write_tail, digest, start, size, data)
                except OSError as e:
                    log.warning("cannot cache the TOC of %s: %s", digest, e)
            index = await loop.run_in_executor(executor, ChunkIndex, reader, digest)
        except BaseException:
            hint.clear()
            if head:
                head[0].release()
            raise
        layer = cls(
            digest,
            head[0] if head else blob,
            reader,
            index,
            options=options,
            memory=memory,
            disk=disk,
            executor=executor,
            scheduler=scheduler,
            tail_bytes=fetched,
            inflight=inflight,
            writer=writer,
        )
        if fetched:
            layer.metrics.fetch_requests += 1
            layer.metrics.fetched_bytes += fetched
        layer.metrics.open_seconds = time.monotonic() - t0
        layer.metrics.open_fetch_seconds = t_fetched - t0
        layer.metrics.open_parse_seconds = layer.metrics.open_seconds - (t_fetched - t0)
        return layer

    # --- accounting ----------------------------------------------------------------------

    def member_rows(self, m: int) -> array:
        return self.m_rows[self.m_first[m] : self.m_first[m + 1]]

    def _member_missing(self, m: int) -> bool:
        disk, inflight, keys = self.disk, self.inflight, self.keys
        for r in self.member_rows(m):
            k = keys[r]
            if k not in disk and k not in inflight:
                return True
        return False

    def fetched_size(self) -> int:
        """Compressed bytes held in the disk cache (the blob's size once all is there)."""
        if self._complete_gen == self.disk.generation:
            return self.size
        disk, keys = self.disk, self.keys
        total = self.size - self.reader.footer.toc_offset
        complete = True
        for m in range(self.n_members):
            if all(keys[r] in disk for r in self.member_rows(m)):
                total += self.m_end[m] - self.m_start[m]
            else:
                complete = False
        if complete:
            self._complete_gen = self.disk.generation
            return self.size
        return min(total, self.size)

    @property
    def fully_fetched(self) -> bool:
        return self.fetched_size() == self.size

    def state(self) -> dict[str, Any]:
        """The state file's JSON object (Go's ``layer.State``)."""
        fetched = self.fetched_size()
        return {
            "digest": self.digest,
            "size": self.size,
            "fetchedSize": fetched,
            "fetchedPercent": (fetched * 100.0 / self.size) if self.size else 100.0,
        }

    # --- reading -------------------------------------------------------------------------

    def file_size(self, node_id: int) -> int:
        return self.reader.nodes[node_id].size

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
            if self.disk.is_verified(key) or not self.verify_keys:
                if count:
                    m.disk_hits += 1
                self.disk.touch(key)
                return None
            if count:
                m.disk_hits += 1
            return self._start_disk_verify(row, key)
        return _MISSING

    def read_now(self, node_id: int, off: int, size: int) -> bytes | None:
        """`read`'s answer when it needs no waiting (one chunk, in memory or verified on
        disk), else None. The FUSE session answers such reads without a coroutine."""
        if self.closed:
            raise LayerClosed(f"layer {self.digest} is unmounted")
        fsize = self.reader.nodes[node_id].size
        if off >= fsize or size <= 0:
            return b""
        if off + size > fsize:
            size = fsize - off
        lo, hi = self.chunks.cover(node_id, off, size)
        if hi != lo + 1:
            return None
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
            try:
                out = disk.pread(key, a, b - a)
            except OSError:
                return None
            if len(out) != b - a:
                return None
            m.disk_hits += 1
            disk.touch(key)
            if b - a >= SEQUENTIAL_READ_MIN and READ_AHEAD_NEXT_CHUNK:
                half = self.row_size[lo] >> 1
                if a < half <= b and lo + 1 < self.chunks.span(node_id)[1]:
                    nxt = self.keys[lo + 1]
                    if disk.is_verified(nxt):
                        disk.willneed(nxt)
        m.reads += 1
        m.bytes_served += len(out)
        return out

    async def read(self, node_id: int, off: int, size: int) -> bytes:
        """Up to ``size`` bytes of file ``node_id`` from ``off`` (fewer at end of file).

        Raises ChunkVerifyError (a chunk failed verification), Unavailable (the source
        failed), LayerClosed.
        """
        out = self.read_now(node_id, off, size)
        if out is not None:
            return out
        if self.closed:
            raise LayerClosed(f"layer {self.digest} is unmounted")
        fsize = self.reader.nodes[node_id].size
        if off >= fsize or size <= 0:
            return b""
        if off + size > fsize:
            size = fsize - off
        lo, hi = self.chunks.cover(node_id, off, size)
        if hi == lo + 1:
            # one chunk (the usual case): no lists, no extra coroutine on a cache hit
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
                    key not in self.inflight
                    and disk.is_verified(key)
                    and b - a <= INLINE_PREAD_MAX
                    and disk.size_of(key) == self.row_size[lo]
                ):
                    try:
                        out = disk.pread(key, a, b - a)
                    except OSError:
                        out = b""
                    if len(out) == b - a:
                        m.disk_hits += 1
                        disk.touch(key)
                        m.reads += 1
                        m.bytes_served += len(out)
                        return out
                got = self._lookup(lo, key, True)
                if got is _MISSING:
                    m.cache_misses += 1
                    self._fetch_rows([lo], "demand")
                    got = self._lookup(lo, key, False)
                out = await self._slice(lo, key, a, b, got)
            m.reads += 1
            m.bytes_served += len(out)
            return out
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
            self._fetch_rows(missing, "demand")
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

    async def _slice(self, row: int, key: str, a: int, b: int, got: Any) -> bytes:
        for _ in range(3):
            if isinstance(got, bytes):
                return got[a:b]
            if isinstance(got, asyncio.Future):
                data = await asyncio.shield(got)
                return data[a:b]
            if got is None:
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
            # gone from the cache meanwhile: fetch it again
            self.metrics.cache_misses += 1
            self._fetch_rows([row], "demand")
            got = self._lookup(row, key, False)
        raise Unavailable(f"chunk {key} of layer {self.digest} keeps disappearing from the cache")

    def _start_disk_verify(self, row: int, key: str) -> asyncio.Future[bytes]:
        """A chunk file found at start is re-hashed once before it is trusted."""
        fut = self._claim(key)
        want = self.chunks.row(row)[4]

        def load() -> bytes | None:
            try:
                data = self.disk.read_file(key)
            except OSError:
                return None
            return data if codec.sha256(data) == want else None

        async def run() -> None:
            try:
                data = await self._loop.run_in_executor(self.executor, load)
            except BaseException as e:
                self._settle(key)
                if not fut.done():
                    fut.set_exception(LayerClosed(f"layer {self.digest} closed: {e!r}"))
                raise
            if data is not None:
                self.disk.mark_verified(key)
                self.memory.put(key, data)
                self._settle(key)
                fut.set_result(data)
                return
            log.warning("dropping damaged cache file of chunk %s (layer %s)", key, self.digest)
            self.metrics.disk_cache_rejects += 1
            self.disk.discard(key)
            self._settle(key)
            inner = self._fetch_rows([row], "demand").get(key) or self.inflight.get(key)
            if inner is None:  # pragma: no cover - fetched meanwhile by someone else
                data2 = self.memory.get(key)
                if data2 is not None:
                    fut.set_result(data2)
                    return
                fut.set_exception(Unavailable(f"chunk {key} could not be refetched"))
                return
            try:
                fut.set_result(await asyncio.shield(inner))
            except Exception as e:
                fut.set_exception(e)

        self._spawn(run())
        return fut

    # --- fetching ------------------------------------------------------------------------

    def _claim(self, key: str) -> asyncio.Future[bytes]:
        fut: asyncio.Future[bytes] = self._loop.create_future()
        fut.add_done_callback(_consume)
        self.inflight[key] = fut
        self._owned.add(key)
        return fut

    def _settle(self, key: str) -> asyncio.Future[bytes] | None:
        """Take this layer's in-flight entry for ``key`` off the table (None if not ours)."""
        if key not in self._owned:
            return None
        self._owned.discard(key)
        return self.inflight.pop(key, None)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _widen(self, members: set[int]) -> set[int]:
        """Add neighbouring wholly-missing members inside the chunk_size-aligned window."""
        cs = self.options.chunk_size
        if cs <= 0:
            return members
        out = set(members)
        for m in members:
            s, e = self.m_start[m], self.m_end[m]
            lo = (s // cs) * cs
            hi = -(-e // cs) * cs
            j = m - 1
            while j >= 0 and self.m_start[j] >= lo and j not in out and self._wholly_missing(j):
                out.add(j)
                j -= 1
            j = m + 1
            while (
                j < self.n_members
                and self.m_end[j] <= hi
                and j not in out
                and self._wholly_missing(j)
            ):
                out.add(j)
                j += 1
        return out

    def _wholly_missing(self, m: int) -> bool:
        disk, inflight, memory, keys = self.disk, self.inflight, self.memory, self.keys
        for r in self.member_rows(m):
            k = keys[r]
            if k in disk or k in inflight or k in memory:
                return False
        return True

    def _fetch_rows(self, rows: Iterable[int], kind: str) -> dict[str, asyncio.Future[bytes]]:
        rows = list(rows)
        members = {self.row_member[r] for r in rows}
        if kind == "demand":
            members = self._widen(members)
            self.metrics.on_demand_fetches += 1
        wanted = frozenset(self.keys[r] for r in rows)
        return self._start_fetch(sorted(members), kind, to_memory=True, wanted=wanted)

    def _start_fetch(
        self,
        members: list[int],
        kind: str,
        *,
        to_memory: bool,
        max_range: int = 0,
        wanted: frozenset[str] = frozenset(),
        gate: asyncio.Semaphore | None = None,
    ) -> dict[str, asyncio.Future[bytes]]:
        """Register futures for the missing chunks of ``members`` and start fetching them.

        Consecutive members become one range; with ``max_range`` a range is cut (at member
        boundaries) before it grows past that many bytes, and each range is its own request
        (``gate`` bounds how many download at once). Returns the new futures by key.
        """
        if self.closed:
            raise LayerClosed(f"layer {self.digest} is unmounted")
        runs: list[list[int]] = []
        for m in members:
            if (
                runs
                and runs[-1][-1] == m - 1
                and not (max_range and self.m_end[m] - self.m_start[runs[-1][0]] > max_range)
            ):
                runs[-1].append(m)
            else:
                runs.append([m])
        ranges: list[tuple[int, int]] = []
        jobs: list[list[tuple[int, str]]] = []
        new: dict[str, asyncio.Future[bytes]] = {}
        for run in runs:
            todo = []
            for m in run:
                for r in self.member_rows(m):
                    k = self.keys[r]
                    if k in self.inflight or k in self.memory or k in self.disk:
                        continue
                    new[k] = self._claim(k)
                    todo.append((r, k))
            if todo:
                ranges.append((self.m_start[run[0]], self.m_end[run[-1]]))
                jobs.append(todo)
        if not ranges:
            return new
        if max_range:
            for rng, job in zip(ranges, jobs, strict=True):
                self._spawn(self._run_fetch([rng], [job], kind, to_memory, wanted, gate))
        else:
            self._spawn(self._run_fetch(ranges, jobs, kind, to_memory, wanted))
        return new

    def _fail(self, jobs: list[list[tuple[int, str]]], exc: BaseException) -> None:
        for job in jobs:
            for _, k in job:
                fut = self._settle(k)
                if fut is not None and not fut.done():
                    fut.set_exception(exc)

    async def _run_fetch(
        self,
        ranges: list[tuple[int, int]],
        jobs: list[list[tuple[int, str]]],
        kind: str,
        to_memory: bool,
        wanted: frozenset[str] = frozenset(),
        gate: asyncio.Semaphore | None = None,
    ) -> None:
        demand = kind == "demand"
        if demand:
            self.scheduler.begin()
        try:
            try:
                async with gate or contextlib.nullcontext():
                    datas = await asyncio.wait_for(
                        self.blob.read_ranges([(s, e - s) for s, e in ranges]),
                        self.options.fetching_timeout_sec or None,
                    )
                if len(datas) != len(ranges) or any(
                    len(d) != e - s for d, (s, e) in zip(datas, ranges, strict=False)
                ):
                    raise Unavailable("the source returned short or missing ranges")
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning(
                    "fetching %d range(s) of layer %s failed: %s", len(ranges), self.digest, e
                )
                self._fail(jobs, Unavailable(f"fetching layer {self.digest} failed: {e}"))
                return
            n = sum(len(d) for d in datas)
            m = self.metrics
            m.fetch_requests += 1
            m.fetched_bytes += n
            if demand:
                m.on_demand_bytes_fetched += n
            elif kind == "prefetch":
                m.prefetch_bytes += n
            else:
                m.background_bytes += n
            urgent: list[tuple[int, str, memoryview]] = []
            batches: list[list[tuple[int, str, memoryview]]] = [[]]
            budget = urgent_bytes = 0
            for data, (s, _), job in zip(datas, ranges, jobs, strict=True):
                view = memoryview(data)
                for r, k in job:
                    mm = self.row_member[r]
                    a, b = self.m_start[mm] - s, self.m_end[mm] - s
                    if k in wanted and urgent_bytes + b - a <= INLINE_DECODE_MAX:
                        urgent.append((r, k, view[a:b]))
                        urgent_bytes += b - a
                        continue
                    if budget >= DECODE_BATCH_BYTES:
                        batches.append([])
                        budget = 0
                    batches[-1].append((r, k, view[a:b]))
                    budget += b - a
            ok: list[tuple[str, bytes]] = []
            if urgent:
                # what a waiting read asked for, when small: decoding it here is faster than
                # a thread hop and its GIL handoffs (native decode of 64 KiB: ~0.1-0.3 ms);
                # the widened neighbours go to the pool
                ok += self._resolve(self._decode(urgent), to_memory)
            results = await asyncio.gather(
                *(self._loop.run_in_executor(self.executor, self._decode, b) for b in batches if b)
            )
            for batch in results:
                ok += self._resolve(batch, to_memory)
            if ok:
                # the write must land even if this task is cancelled (unmount, shutdown):
                # shielded, and its result committed to the index by a callback
                wfut = self._loop.run_in_executor(self.writer, self._write, ok)
                wfut.add_done_callback(self._commit_written)
                self._add_backlog(sum(len(d) for _, d in ok), wfut)
                try:
                    await asyncio.shield(wfut)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # the data still serves from the futures/memory
                    log.warning("cannot write chunks to the disk cache: %s", e)
            for k, data in ok:
                fut = self._settle(k)
                if fut is not None and not fut.done():
                    fut.set_result(data)
        except BaseException as e:
            self._fail(jobs, LayerClosed(f"fetch of layer {self.digest} stopped: {e!r}"))
            raise
        finally:
            if demand:
                self.scheduler.end(read=True)

    def _add_backlog(self, nbytes: int, wfut: asyncio.Future[Any]) -> None:
        self._backlog += nbytes
        if self._backlog > WRITE_BACKLOG_MAX:
            self._backlog_ok.clear()

        def done(_: asyncio.Future[Any]) -> None:
            self._backlog -= nbytes
            if self._backlog <= WRITE_BACKLOG_MAX:
                self._backlog_ok.set()

        wfut.add_done_callback(done)

    def _commit_written(self, fut: asyncio.Future[list[tuple[str, int]]]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        for k, size in fut.result():
            self.disk.commit(k, size)

    def _resolve(
        self, batch: list[tuple[int, str, bytes | None, BaseException | None]], to_memory: bool
    ) -> list[tuple[str, bytes]]:
        """Hand decoded chunks to their waiters (failures: EIO, never cached)."""
        ok = []
        sync = self.options.sync_add
        for r, k, data, err in batch:
            fut = self.inflight.get(k) if k in self._owned else None
            if err is not None or data is None:
                self.metrics.verification_failures += 1
                log.warning(
                    "chunk failed verification, not served",
                    extra={
                        "layer": self.digest,
                        "path": self.reader.nodes[self.chunks.file_id(r)].path,
                        "chunk": k,
                        "error": str(err),
                    },
                )
                self._settle(k)
                if fut is not None and not fut.done():
                    fut.set_exception(ChunkVerifyError(f"chunk {k} of layer {self.digest}: {err}"))
                continue
            if to_memory:
                self.memory.put(k, data)
            if fut is not None and not fut.done() and not sync:
                fut.set_result(data)
            ok.append((k, data))
        return ok

    def _decode(
        self, batch: list[tuple[int, str, memoryview]]
    ) -> list[tuple[int, str, bytes | None, BaseException | None]]:
        out: list[tuple[int, str, bytes | None, BaseException | None]] = []
        for r, k, view in batch:
            try:
                out.append((r, k, self.reader.decode_chunk(r, view), None))
            except Exception as e:  # every failure (codec, digest, bomb) means: not served
                out.append((r, k, None, e))
        return out

    def _write(self, items: list[tuple[str, bytes]]) -> list[tuple[str, int]]:
        done = []
        for k, data in items:
            try:
                done.append((k, self.disk.write_file(k, data)))
            except OSError as e:
                log.warning("cannot write chunk %s to the disk cache: %s", k, e)
        return done

    # --- prefetch and background fetch -------------------------------------------------------

    def start_prefetch(self, size: int) -> asyncio.Task[Any]:
        self.prefetch_size = min(max(size, 0), self.size)
        return self._spawn(self._prefetch(self.prefetch_size))

    async def _prefetch(self, size: int) -> None:
        t0 = time.monotonic()
        try:
            if size <= 0:
                return
            async with self.scheduler.prioritized():
                last = bisect_right(self.m_start, size - 1)
                members = [m for m in range(last) if self._member_missing(m)]
                futs = self._start_fetch(
                    members,
                    "prefetch",
                    to_memory=True,
                    max_range=self.options.prefetch_chunk_size or PREFETCH_PIECE,
                    gate=asyncio.Semaphore(
                        1 if size <= PREFETCH_ONE_FLOW_MAX else PREFETCH_PARALLEL
                    ),
                )
                if futs:
                    await asyncio.gather(*futs.values(), return_exceptions=True)
            log.info(
                "prefetch done",
                extra={
                    "layer": self.digest,
                    "bytes": self.metrics.prefetch_bytes,
                    "seconds": round(time.monotonic() - t0, 4),
                },
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("prefetch of layer %s failed", self.digest)
        finally:
            self.metrics.prefetch_seconds = time.monotonic() - t0
            self.prefetch_done.set()
            if isinstance(self.blob, HeadStartBlob):
                self.blob.release()  # the prefetch has what it started; drop the rest

    def start_background_fetch(self) -> asyncio.Task[Any]:
        return self._spawn(self._background())

    async def _background(self) -> None:
        await self.prefetch_done.wait()
        step = max(self.options.background_request_bytes, 1)
        m = 0
        try:
            while m < self.n_members and not self.closed:
                batch: list[int] = []
                nbytes = 0
                while m < self.n_members and nbytes < step:
                    if self._member_missing(m):
                        batch.append(m)
                        nbytes += self.m_end[m] - self.m_start[m]
                    elif batch:
                        m += 1
                        break
                    m += 1
                if not batch:
                    continue
                await self._backlog_ok.wait()
                async with self.scheduler.background():
                    if self.closed:
                        return
                    futs = self._start_fetch(batch, "background", to_memory=False)
                    if futs:
                        got = await asyncio.wait_for(
                            asyncio.gather(*futs.values(), return_exceptions=True),
                            self.options.background_timeout_sec,
                        )
                        failed = [g for g in got if isinstance(g, BaseException)]
                        if (
                            failed
                            and len(failed) == len(got)
                            and not any(isinstance(g, VerificationError) for g in failed)
                        ):
                            # the source is gone: reads will say so; don't hammer it
                            log.warning(
                                "background fetch stopped: %s",
                                failed[0],
                                extra={"layer": self.digest},
                            )
                            return
            # let the last writes land before judging completeness
            while self._owned and not self.closed:
                await asyncio.sleep(0.01)
            if not self.closed and self.fully_fetched:
                log.info("layer fully fetched", extra={"layer": self.digest})
            if not self.closed:
                await self._loop.run_in_executor(self.executor, memory.trim)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background fetch of layer %s failed", self.digest)

    # --- helpers for the FUSE layer ------------------------------------------------------------

    def cached_chunks(self, node_id: int, limit: int) -> list[tuple[int, bytes]]:
        """``(file offset, data)`` of the file's chunks that are in memory right now.

        At most ``limit`` bytes. Nothing is fetched or read from disk: this runs inside
        the FUSE open handler, so it must cost microseconds.
        """
        out: list[tuple[int, bytes]] = []
        lo, hi = self.chunks.span(node_id)
        total = 0
        for r in range(lo, hi):
            size = self.row_size[r]
            if total + size > limit:
                break
            k = self.keys[r]
            data = self.memory.get(k)
            if data is None:
                fut = self.inflight.get(k)
                if fut is not None and fut.done() and not fut.cancelled() and not fut.exception():
                    data = fut.result()
            if data is not None:
                out.append((self.row_coff[r], data))
                total += size
        return out

    def mtime_ns(self, node_id: int) -> int:
        return _parse_modtime(self.reader.nodes[node_id].modtime)

    async def close(self) -> None:
        """Stop prefetch, background and in-flight fetches; pending reads fail."""
        self.closed = True
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for k in list(self._owned):
            fut = self._settle(k)
            if fut is not None and not fut.done():
                fut.set_exception(LayerClosed(f"layer {self.digest} is unmounted"))
        self.prefetch_done.set()
        closer = getattr(self.blob, "close", None)
        if closer is not None:
            res = closer()
            if asyncio.iscoroutine(res):
                await res


__all__ = ["ChunkVerifyError", "DigestMismatch", "Layer", "LayerClosed", "fetch_tail"]
