"""Fetched bytes -> decoded, verified chunks -> their waiters and the caches.

A request's chunks are decoded in batches (at most ``DECODE_BATCH_BYTES`` compressed or
``DECODE_BATCH_OUT`` declared bytes; small ones a read waits for on the event loop, the
rest in the worker pool) and in waves of at most ``DECODED_WAVE_MAX`` declared bytes, each
written to the disk cache (one writer thread) and handed to its waiters before the next
wave is decoded: what is held is bounded by the request's declared sizes, never by how
well the blob compresses. A chunk that fails to decode or verify is never cached or
returned (ChunkVerifyError: EIO).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from typing import Any, Protocol

from stargz.errors import VerificationError
from stargz.estargz import codec
from stargz.estargz.reader import Reader
from stargz.fs.cache import DiskCache, MemoryLRU
from stargz.fs.chunks import ChunkIndex, FetchedSize
from stargz.fs.metrics import LayerMetrics

log = logging.getLogger("stargz.fs")

#: Compressed bytes decoded per worker-thread job (bigger fetches are split across threads).
DECODE_BATCH_BYTES = 1 << 20
#: On-demand fetches up to this many compressed bytes are decoded on the event loop.
INLINE_DECODE_MAX = 64 << 10
#: Declared (decoded) bytes per worker-thread decode job, and per wave of jobs: a wave is
#: decoded, handed to its waiters and written to the cache before the next is decoded. A
#: normal 4 MiB background request (~12 MiB decoded) is one wave; a request of zero-filled
#: files (1000:1) is many, instead of gigabytes at once.
DECODE_BATCH_OUT = 4 << 20
DECODED_WAVE_MAX = 16 << 20
#: Decoded bytes of this layer that may wait for the cache writer before background fetch
#: pauses. Without it the download outran the (single, niced) writer thread: 470 MB RSS
#: while background-fetching a 144 MB layer on loopback (benchmarks/bench_daemon_cost.py).
WRITE_BACKLOG_MAX = 16 << 20

#: A decoded row waiting for its waiter / the cache: (row, key, bytes or None, error).
Decoded = tuple[int, str, bytes | None, BaseException | None]
#: A row to decode: (row, key, its member's compressed bytes, or a prefix of them).
Encoded = tuple[int, str, memoryview]


class ChunkVerifyError(VerificationError):
    """A chunk failed to decode or did not match its chunkDigest; it was not served."""


class InflightTable(Protocol):
    """The fetch engine's side: the futures reads wait on."""

    def owned_future(self, key: str) -> asyncio.Future[bytes] | None: ...

    def settle(self, key: str) -> asyncio.Future[bytes] | None: ...


class Delivery:
    """Decodes, verifies and stores the chunks of a layer's fetched ranges."""

    def __init__(
        self,
        digest: str,
        reader: Reader,
        index: ChunkIndex,
        table: InflightTable,
        *,
        memory: MemoryLRU,
        disk: DiskCache,
        executor: Executor,
        writer: Executor,
        metrics: LayerMetrics,
        fetched: FetchedSize,
        sync_add: bool,
    ) -> None:
        self.digest = digest
        self.reader = reader
        self.index = index
        self._table = table
        self.memory = memory
        self.disk = disk
        self.executor = executor
        self.writer = writer
        self.metrics = metrics
        self.fetched = fetched
        self.sync_add = sync_add
        self._loop = asyncio.get_running_loop()
        #: Decoded bytes handed to the cache writer and not written yet; background fetch
        #: waits for `backlog_ok` (backlog <= WRITE_BACKLOG_MAX) before each request.
        self._backlog = 0
        self.backlog_ok = asyncio.Event()
        self.backlog_ok.set()

    async def deliver(
        self,
        datas: list[bytes],
        ranges: list[tuple[int, int]],
        jobs: list[list[tuple[int, str]]],
        wanted: frozenset[str],
        to_memory: bool,
    ) -> None:
        """Decode the ``jobs`` rows from the fetched ``datas`` of ``ranges``; ``wanted``
        keys (a read waits for them) go first, ``to_memory`` puts chunks in the LRU too."""
        idx = self.index
        row_size = idx.row_size
        urgent: list[Encoded] = []
        batches: list[list[Encoded]] = [[]]
        budget = out_budget = urgent_bytes = 0
        table = self._table
        for data, (s, _), job in zip(datas, ranges, jobs, strict=True):
            view = memoryview(data)
            for r, k in job:
                fut = table.owned_future(k)
                if fut is None or fut.done():
                    continue  # delivered already (a read fetched it ahead), or closed
                mm = idx.row_member[r]
                a, b = idx.m_start[mm] - s, min(idx.m_end[mm] - s, len(data))
                if k in wanted and urgent_bytes + b - a <= INLINE_DECODE_MAX:
                    urgent.append((r, k, view[a:b]))
                    urgent_bytes += b - a
                    continue
                if budget >= DECODE_BATCH_BYTES or (
                    batches[-1] and out_budget + row_size[r] > DECODE_BATCH_OUT
                ):
                    batches.append([])
                    budget = out_budget = 0
                batches[-1].append((r, k, view[a:b]))
                budget += b - a
                out_budget += row_size[r]
        ok: list[tuple[int, str, bytes]] = []
        if urgent:
            # what a waiting read asked for, when small: decoding it here is faster than
            # a thread hop and its GIL handoffs (native decode of 64 KiB: ~0.1-0.3 ms);
            # the widened neighbours go to the pool
            ok += self._resolve(self._decode(urgent), to_memory)
        for wave in _waves([b for b in batches if b], row_size):
            results = await asyncio.gather(
                *(self._loop.run_in_executor(self.executor, self._decode, b) for b in wave)
            )
            for batch in results:
                ok += self._resolve(batch, to_memory)
            await self._store(ok)
            ok = []
        await self._store(ok)

    async def _store(self, ok: list[tuple[int, str, bytes]]) -> None:
        """Write decoded chunks to the disk cache, then hand them to their waiters."""
        if ok:
            # the write must land even if this task is cancelled (unmount, shutdown):
            # shielded, and its result committed to the index by a callback
            wfut = self._loop.run_in_executor(self.writer, self._write, ok)
            wfut.add_done_callback(self._commit_written)
            self._add_backlog(sum(len(d) for _, _, d in ok), wfut)
            try:
                await asyncio.shield(wfut)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the data still serves from the futures/memory
                log.warning("cannot write chunks to the disk cache: %s", e)
        for _, k, data in ok:
            fut = self._table.settle(k)
            if fut is not None and not fut.done():
                fut.set_result(data)

    def _add_backlog(self, nbytes: int, wfut: asyncio.Future[Any]) -> None:
        self._backlog += nbytes
        if self._backlog > WRITE_BACKLOG_MAX:
            self.backlog_ok.clear()

        def done(_: asyncio.Future[Any]) -> None:
            self._backlog -= nbytes
            if self._backlog <= WRITE_BACKLOG_MAX:
                self.backlog_ok.set()

        wfut.add_done_callback(done)

    def _commit_written(self, fut: asyncio.Future[list[tuple[int, str, int, str]]]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        written = fut.result()

        def placed(ok: list[bool]) -> None:
            self.fetched.committed([w[0] for w, good in zip(written, ok, strict=True) if good])

        self.disk.commit_later([(k, size, tmp) for _, k, size, tmp in written], placed)

    def _resolve(self, batch: list[Decoded], to_memory: bool) -> list[tuple[int, str, bytes]]:
        """Hand decoded chunks to their waiters (failures: EIO, never cached)."""
        ok = []
        sync = self.sync_add
        for r, k, data, err in batch:
            fut = self._table.owned_future(k)
            if err is not None or data is None:
                self.metrics.verification_failures += 1
                self.metrics.note_error(f"chunk {k} failed verification: {err}")
                log.warning(
                    "chunk failed verification, not served",
                    extra={
                        "layer": self.digest,
                        "path": self.reader.nodes[self.reader.chunks.file_id(r)].path,
                        "chunk": k,
                        "error": str(err),
                    },
                )
                self._table.settle(k)
                if fut is not None and not fut.done():
                    fut.set_exception(ChunkVerifyError(f"chunk {k} of layer {self.digest}: {err}"))
                continue
            if to_memory:
                self.memory.put(k, data)
            if fut is not None and not fut.done() and not sync:
                fut.set_result(data)
            ok.append((r, k, data))
        return ok

    def _decode(self, batch: list[Encoded]) -> list[Decoded]:
        out: list[Decoded] = []
        reader, idx = self.reader, self.index
        for r, k, view in batch:
            m = idx.row_member[r]
            try:
                if len(view) < idx.m_end[m] - idx.m_start[m]:
                    # a member prefix (see _fetch_end): decode up to the chunk's end only;
                    # the digest (every row of such a member has one) checks the bytes
                    _, _, inner, size, digest = reader.chunks.row(r)
                    data = codec.decode_chunk(view, reader.compression, inner, size, digest, False)
                else:
                    data = reader.decode_chunk(r, view)
                out.append((r, k, data, None))
            except Exception as e:  # every failure (codec, digest, bomb) means: not served
                out.append((r, k, None, e))
        return out

    def _write(self, items: list[tuple[int, str, bytes]]) -> list[tuple[int, str, int, str]]:
        """Write chunks to tmp/ (their commit places them: see `DiskCache.commit`)."""
        done = []
        for r, k, data in items:
            try:
                done.append((r, k, len(data), self.disk.write_tmp(k, data)))
            except OSError as e:
                log.warning("cannot write chunk %s to the disk cache: %s", k, e)
        return done


def _waves(batches: list[list[Encoded]], row_size: Any) -> list[list[list[Encoded]]]:
    """Group decode batches so that each group declares at most DECODED_WAVE_MAX bytes."""
    waves: list[list[list[Encoded]]] = []
    held = 0
    for b in batches:
        n = sum(row_size[r] for r, _, _ in b)
        if not waves or held + n > DECODED_WAVE_MAX:
            waves.append([])
            held = 0
        waves[-1].append(b)
        held += n
    return waves


__all__ = ["ChunkVerifyError", "Delivery", "InflightTable"]
