"""One opened layer: the parts that serve its files' bytes, put together.

- opening (footer, TOC, chunk index): :mod:`stargz.fs.layer_open`
- the chunk index and what of it is cached: :mod:`stargz.fs.chunks`
- the read path (caches first, then the fetch engine): :mod:`stargz.fs.read`
- the fetch engine (in-flight table, ranges): :mod:`stargz.fs.fetch`
- decode + verify + cache writes of fetched ranges: :mod:`stargz.fs.delivery`
- prefetch and background fetch: :mod:`stargz.fs.background`
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import time
from concurrent.futures import Executor
from typing import Any

from stargz.errors import DigestMismatch
from stargz.estargz.reader import Reader
from stargz.fs.background import BackgroundFetch
from stargz.fs.cache import DiskCache, MemoryLRU
from stargz.fs.chunks import ChunkFile, ChunkIndex, FetchedSize
from stargz.fs.delivery import ChunkVerifyError
from stargz.fs.fetch import Fetcher, LayerClosed
from stargz.fs.layer_open import fetch_tail, open_layer
from stargz.fs.metrics import LayerMetrics
from stargz.fs.options import FsOptions
from stargz.fs.read import ReadPath
from stargz.fs.scheduler import Scheduler
from stargz.fs.source import Blob


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


class Layer:
    """An opened blob plus everything needed to serve its files' bytes.

    Build with :meth:`open`. ``reader`` is the format-level view (nodes, TOC, chunk
    table), ``index`` the chunk index; ``metrics`` counts what it cost. Coroutines run on
    the event loop that opened the layer. ``read_now`` / ``read`` / ``read_later`` are the
    read path's own bound methods (no extra call on the hot path).
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
        self.reader = reader
        self.index = index
        self.options = options
        self.memory = memory
        self.disk = disk
        self.metrics = LayerMetrics()
        self.size = blob.size
        self.tail_bytes = tail_bytes
        self.chunks = reader.chunks
        self.last_check = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self._fetched = FetchedSize(index, disk, blob.size)
        #: Cache writes get their own thread(s) so decodes never queue behind them.
        self.fetcher = Fetcher(
            digest,
            blob,
            reader,
            index,
            options=options,
            memory=memory,
            disk=disk,
            executor=executor,
            writer=writer or executor,
            scheduler=scheduler,
            metrics=self.metrics,
            fetched=self._fetched,
            inflight={} if inflight is None else inflight,
        )
        self.reads = ReadPath(
            digest,
            reader,
            index,
            self.fetcher,
            memory=memory,
            disk=disk,
            executor=executor,
            metrics=self.metrics,
            read_ahead_next_chunk=options.read_ahead_next_chunk,
        )
        self._background = BackgroundFetch(self.fetcher, self._fetched, blob.size)
        self.read_now = self.reads.read_now
        self.read = self.reads.read
        self.read_later = self.reads.read_later
        self.prefetch_done = self._background.prefetch_done

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
        cache_scope: str = "",
        tail: tuple[int, bytes, int] | None = None,
    ) -> Layer:
        """Open ``blob`` (see `stargz.fs.layer_open.open_layer`) and put its parts together.

        Raises FooterError/TOCError for a blob that is not eStargz, DigestMismatch when
        the TOC does not hash to ``toc_digest``. ``inflight`` is the in-flight table of the
        layer's source; ``cache_scope`` names that source for unverified chunks' keys;
        ``tail``: the footer + TOC bytes already fetched (see `open_layer`).
        """
        o = await open_layer(
            digest,
            blob,
            toc_digest=toc_digest,
            verify=verify,
            options=options,
            disk=disk,
            executor=executor,
            cache_scope=cache_scope,
            tail=tail,
        )
        layer = cls(
            digest,
            o.blob,
            o.reader,
            o.index,
            options=options,
            memory=memory,
            disk=disk,
            executor=executor,
            scheduler=scheduler,
            tail_bytes=o.tail_bytes,
            inflight=inflight,
            writer=writer,
        )
        m = layer.metrics
        if o.tail_bytes:
            m.fetch_requests += 1
            m.fetched_bytes += o.tail_bytes
        m.open_fetch_seconds = o.fetch_seconds
        m.open_parse_seconds = o.parse_seconds
        m.open_seconds = o.fetch_seconds + o.parse_seconds
        return layer

    # --- the blob ------------------------------------------------------------------------

    @property
    def blob(self) -> Blob:
        return self.fetcher.blob

    @blob.setter
    def blob(self, blob: Blob) -> None:
        """A re-resolved blob (same layer, fresh URL or connection)."""
        self.fetcher.blob = blob

    @property
    def closed(self) -> bool:
        return self.fetcher.closed

    # --- what is cached ------------------------------------------------------------------

    def fetched_size(self) -> int:
        """Compressed bytes held in the disk cache (the blob's size once all is there)."""
        return self._fetched.value()

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

    def chunk_files(self, node_id: int) -> list[ChunkFile]:
        """The verified cache files of a file's chunks in order; [] unless all are there."""
        return self.index.verified_files(node_id, self.reader.nodes[node_id].size, self.disk)

    def cached_chunks(self, node_id: int, limit: int) -> list[tuple[int, bytes]]:
        """``(file offset, data)`` of the file's chunks that are in memory right now.

        At most ``limit`` bytes. Nothing is fetched or read from disk: this runs inside
        the FUSE open handler, so it must cost microseconds.
        """
        out: list[tuple[int, bytes]] = []
        lo, hi = self.chunks.span(node_id)
        idx = self.index
        inflight = self.fetcher.inflight
        total = 0
        for r in range(lo, hi):
            size = idx.row_size[r]
            if total + size > limit:
                break
            k = idx.keys[r]
            data = self.memory.get(k)
            if data is None:
                fut = inflight.get(k)
                if fut is not None and fut.done() and not fut.cancelled() and not fut.exception():
                    data = fut.result()
            if data is not None:
                out.append((idx.row_coff[r], data))
                total += size
        return out

    # --- files ---------------------------------------------------------------------------

    def file_size(self, node_id: int) -> int:
        return self.reader.nodes[node_id].size

    def mtime_ns(self, node_id: int) -> int:
        return _parse_modtime(self.reader.nodes[node_id].modtime)

    # --- prefetch, background, close -----------------------------------------------------

    @property
    def prefetch_size(self) -> int:
        return self._background.prefetch_size

    def start_prefetch(self, size: int) -> asyncio.Task[Any]:
        return self._background.start_prefetch(size, self.size)

    def start_background_fetch(self) -> asyncio.Task[Any]:
        return self._background.start_background_fetch()

    async def close(self) -> None:
        """Stop prefetch, background and in-flight fetches; every pending read fails
        (LayerClosed)."""
        self.reads.closed = True
        await self.fetcher.close()
        self.prefetch_done.set()
        closer = getattr(self.blob, "close", None)
        if closer is not None:
            res = closer()
            if asyncio.iscoroutine(res):
                await res


__all__ = ["ChunkVerifyError", "DigestMismatch", "Layer", "LayerClosed", "fetch_tail"]
