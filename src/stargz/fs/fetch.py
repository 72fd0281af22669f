"""The fetch engine of a layer: missing chunks -> range requests (-> `stargz.fs.delivery`).

One fetch per chunk at a time: a chunk being fetched has a future in the in-flight table
(keyed by cache key; one table per source repository, see `StargzFileSystem`) that every
read of it awaits. Neighbouring missing members are coalesced into one range, small
on-demand ranges widened to ``chunk_size``. A member is fetched only as far as decoding
its chunks can need (`compressed_bound` of the uncompressed bytes up to its last chunk's
end; the chunk digest still checks the result, so a too-short prefix means EIO, never
wrong bytes). Chunk files found in the disk cache at start are checked once before use
(their xxh3 record; sha256 against the chunkDigest where none was recorded).

Every future this layer creates is failed with `LayerClosed` by `close`, whatever state
its fetch is in: a read waiting on one always gets an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from concurrent.futures import Executor
from typing import Any

from stargz.errors import Unavailable
from stargz.estargz import codec
from stargz.estargz.reader import Reader
from stargz.fs.cache import CHECK_BAD, CHECK_OK, DiskCache, MemoryLRU
from stargz.fs.chunks import ChunkIndex, FetchedSize
from stargz.fs.delivery import Delivery
from stargz.fs.headstart import HeadStartBlob
from stargz.fs.metrics import LayerMetrics
from stargz.fs.options import FsOptions
from stargz.fs.scheduler import Scheduler
from stargz.fs.source import Blob

log = logging.getLogger("stargz.fs")
_ZERO_DIGEST = bytes(32)

#: A read waiting for a chunk whose prefetch request has not started yet (queued behind
#: the prefetch's other pieces) fetches the chunk's member itself if it is at most this
#: big, at most OVERTAKE_PARALLEL such fetches at a time per layer: containerd's create
#: reads /etc/group, and a workload its first files, without waiting for megabytes
#: queued ahead of them (see `Fetcher.overtake`).
OVERTAKE_MAX_BYTES = 1 << 20
OVERTAKE_PARALLEL = 4

#: Compressed bytes allowed for the gzip header (FEXTRA/FNAME/FCOMMENT) and trailer, or
#: the zstd frame header and checksum, on top of the codec's worst case for the data.
MEMBER_SLACK = 4096


def compressed_bound(n: int, compression: str) -> int:
    """Most compressed bytes a sane encoder spends on the first ``n`` bytes of a member.

    deflate never emits more than stored blocks cost (5 bytes per block; zlib's bound
    counts one per 16 KiB), zstd never more than ZSTD_COMPRESSBOUND.
    """
    if compression == "zstd":
        small = ((128 << 10) - n) >> 11 if n < (128 << 10) else 0
        return n + (n >> 8) + small + MEMBER_SLACK
    return n + 5 * (n // 16384 + 1) + MEMBER_SLACK


class LayerClosed(Unavailable):
    """The layer was unmounted while a read waited for it."""


def _consume(fut: asyncio.Future[Any]) -> None:
    # A failed fetch that nobody awaits any more must not be logged as "never retrieved".
    if not fut.cancelled():
        fut.exception()


class Fetcher:
    """Fetches, verifies and caches the chunks of one layer (see the module doc)."""

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
        writer: Executor,
        scheduler: Scheduler,
        metrics: LayerMetrics,
        fetched: FetchedSize,
        inflight: dict[str, asyncio.Future[bytes]],
    ) -> None:
        self.digest = digest
        self.blob = blob
        self.reader = reader
        self.index = index
        self.options = options
        self.memory = memory
        self.disk = disk
        self.executor = executor
        self.writer = writer
        self.scheduler = scheduler
        self.metrics = metrics
        self.fetched = fetched
        #: Chunk key -> future of its bytes, while being fetched; shared with the other
        #: layers of the same source.
        self.inflight = inflight
        self.closed = False
        self._owned: set[str] = set()  # the keys of `inflight` this layer fetches
        #: Keys of fetches waiting for their gate (prefetch pieces not started yet).
        self._queued: set[str] = set()
        self._overtaking = 0
        #: Every future this layer made that a read may be waiting on (until resolved).
        self._futures: set[asyncio.Future[bytes]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop = asyncio.get_running_loop()
        self.delivery = Delivery(
            digest,
            reader,
            index,
            self,
            memory=memory,
            disk=disk,
            executor=executor,
            writer=writer,
            metrics=metrics,
            fetched=fetched,
            sync_add=options.sync_add,
        )

    # --- bookkeeping ---------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Fetches of this layer are still under way."""
        return bool(self._owned)

    def is_mine(self, fut: asyncio.Future[bytes]) -> bool:
        return fut in self._futures

    def follow(self, other: asyncio.Future[bytes]) -> asyncio.Future[bytes]:
        """A future of this layer with ``other``'s outcome (another layer's fetch of a
        chunk this layer wants): `close` answers it even if ``other`` never resolves."""
        own = self._new_future()

        def copy(f: asyncio.Future[bytes]) -> None:
            if own.done():
                return
            if f.cancelled():
                own.set_exception(Unavailable(f"a shared fetch for layer {self.digest} stopped"))
            elif f.exception() is not None:
                own.set_exception(f.exception())
            else:
                own.set_result(f.result())

        other.add_done_callback(copy)
        return own

    def _closed_error(self) -> LayerClosed:
        return LayerClosed(f"layer {self.digest} is unmounted")

    def _new_future(self) -> asyncio.Future[bytes]:
        fut: asyncio.Future[bytes] = self._loop.create_future()
        fut.add_done_callback(_consume)
        self._futures.add(fut)
        fut.add_done_callback(self._futures.discard)
        return fut

    def _claim(self, key: str) -> asyncio.Future[bytes]:
        fut = self._new_future()
        self.inflight[key] = fut
        self._owned.add(key)
        return fut

    def settle(self, key: str) -> asyncio.Future[bytes] | None:
        """Take this layer's in-flight entry for ``key`` off the table (None if not ours)."""
        if key not in self._owned:
            return None
        self._owned.discard(key)
        return self.inflight.pop(key, None)

    def owned_future(self, key: str) -> asyncio.Future[bytes] | None:
        """This layer's in-flight future for ``key``, if this layer is fetching it."""
        return self.inflight.get(key) if key in self._owned else None

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Stop every task, and fail every future a read may wait on (LayerClosed)."""
        self.closed = True
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for k in list(self._owned):
            self.settle(k)
        self._queued.clear()
        for fut in list(self._futures):
            if not fut.done():
                fut.set_exception(self._closed_error())

    # --- what is missing -----------------------------------------------------------------

    def member_missing(self, m: int) -> bool:
        disk, inflight, keys = self.disk, self.inflight, self.index.keys
        for r in self.index.member_rows(m):
            k = keys[r]
            if k not in disk and k not in inflight:
                return True
        return False

    def _wholly_missing(self, m: int) -> bool:
        disk, inflight, memory, keys = self.disk, self.inflight, self.memory, self.index.keys
        for r in self.index.member_rows(m):
            k = keys[r]
            if k in disk or k in inflight or k in memory:
                return False
        return True

    def _widen(self, members: set[int]) -> set[int]:
        """Add neighbouring wholly-missing members inside the chunk_size-aligned window."""
        cs = self.options.chunk_size
        if cs <= 0:
            return members
        idx = self.index
        out = set(members)
        for m in members:
            s, e = idx.m_start[m], idx.m_end[m]
            lo = (s // cs) * cs
            hi = -(-e // cs) * cs
            j = m - 1
            while j >= 0 and idx.m_start[j] >= lo and j not in out and self._wholly_missing(j):
                out.add(j)
                j -= 1
            j = m + 1
            while (
                j < idx.n_members
                and idx.m_end[j] <= hi
                and j not in out
                and self._wholly_missing(j)
            ):
                out.add(j)
                j += 1
        return out

    # --- starting fetches ----------------------------------------------------------------

    def fetch_rows(self, rows: Iterable[int], kind: str) -> dict[str, asyncio.Future[bytes]]:
        rows = list(rows)
        members = {self.index.row_member[r] for r in rows}
        if kind == "demand":
            members = self._widen(members)
            self.metrics.on_demand_fetches += 1
        wanted = frozenset(self.index.keys[r] for r in rows)
        return self.start_fetch(sorted(members), kind, to_memory=True, wanted=wanted)

    def start_fetch(
        self,
        members: list[int],
        kind: str,
        *,
        to_memory: bool,
        max_range: int = 0,
        wanted: frozenset[str] = frozenset(),
        gate: asyncio.Semaphore | None = None,
        tasks: list[asyncio.Task[Any]] | None = None,
    ) -> dict[str, asyncio.Future[bytes]]:
        """Register futures for the missing chunks of ``members`` and start fetching them.

        Consecutive members become one range; with ``max_range`` a range is cut (at member
        boundaries) before it grows past that many bytes, and each range is its own request
        (``gate`` bounds how many download at once). Returns the new futures by key, and
        appends the fetch tasks to ``tasks``: each ends with the error that stopped its
        download, or None. (Prefetch and background fetch wait for the tasks: a future
        keeps its chunk's bytes for as long as anyone holds it.)
        """
        if self.closed:
            raise self._closed_error()
        idx = self.index
        runs: list[list[int]] = []
        ends: dict[int, int] = {}
        cut = False  # the previous member is fetched only in part: no range goes past it
        for m in members:
            end = ends[m] = self._fetch_end(m)
            if (
                runs
                and not cut
                and runs[-1][-1] == m - 1
                and not (max_range and end - idx.m_start[runs[-1][0]] > max_range)
            ):
                runs[-1].append(m)
            else:
                runs.append([m])
            cut = end < idx.m_end[m]
        ranges: list[tuple[int, int]] = []
        jobs: list[list[tuple[int, str]]] = []
        new: dict[str, asyncio.Future[bytes]] = {}
        for run in runs:
            todo = []
            for m in run:
                for r in idx.member_rows(m):
                    k = idx.keys[r]
                    if k in self.inflight or k in self.memory or k in self.disk:
                        continue
                    new[k] = self._claim(k)
                    todo.append((r, k))
            if todo:
                ranges.append((idx.m_start[run[0]], ends[run[-1]]))
                jobs.append(todo)
        if not ranges:
            return new
        if gate is not None:
            self._queued.update(k for job in jobs for _, k in job)
        if max_range:
            started = [
                self.spawn(self._run_fetch([rng], [job], kind, to_memory, wanted, gate))
                for rng, job in zip(ranges, jobs, strict=True)
            ]
        else:
            started = [self.spawn(self._run_fetch(ranges, jobs, kind, to_memory, wanted))]
        if tasks is not None:
            tasks += started
        return new

    def _fetch_end(self, m: int) -> int:
        """Where fetching member ``m`` can stop: its end, or sooner when its chunks (all
        verified by digest) decode from a prefix."""
        idx = self.index
        span = idx.m_end[m] - idx.m_start[m]
        if not idx.verify or span <= MEMBER_SLACK:
            return idx.m_end[m]
        row = self.reader.chunks.row
        need = 0
        for r in idx.member_rows(m):
            _, _, inner, size, digest = row(r)
            if digest == _ZERO_DIGEST:  # nothing but the member's own CRC checks this one
                return idx.m_end[m]
            need = max(need, inner + size)
        return idx.m_start[m] + min(span, compressed_bound(need, self.reader.compression))

    def start_disk_verify(self, row: int, key: str) -> asyncio.Future[bytes]:
        """A chunk file found at start is checked once before it is trusted: against its
        xxh3 record, or (none recorded) re-hashed against its chunkDigest; a chunk of an
        unverified layer without a record is trusted as its layer is. A damaged one is
        deleted, counted and fetched again."""
        fut = self._claim(key)
        want = self.reader.chunks.row(row)[4] if self.index.verify else None
        check_file = self.disk.read_checked

        def load() -> tuple[bytes | None, bool]:
            """(trusted bytes or None, whether the file was damaged)."""
            try:
                verdict, data = check_file(key)
            except OSError:
                return None, False
            if verdict == CHECK_OK:
                return data, False
            if verdict == CHECK_BAD:
                return None, True
            if want == _ZERO_DIGEST:
                return None, False
            if want is not None and codec.sha256(data) != want:
                return None, True
            # (checked by its digest, or as trusted as its unverified layer): recorded
            # now, the next start checks it by xxh3
            self.disk.add_record(key, data)
            return data, False

        async def run() -> None:
            try:
                data, damaged = await self._loop.run_in_executor(self.executor, load)
                if data is not None:
                    self.disk.mark_verified(key)
                    self.memory.put(key, data)
                    self.settle(key)
                    fut.set_result(data)
                    return
                self.metrics.disk_cache_rejects += 1
                if damaged:
                    self.disk.damaged(key, f"chunk of layer {self.digest}")
                else:
                    self.disk.discard(key)
                self.settle(key)  # (fut stays in _futures: close() still answers it)
                inner = self.fetch_rows([row], "demand").get(key) or self.inflight.get(key)
                if inner is None:  # pragma: no cover - fetched meanwhile by someone else
                    data = self.memory.get(key)
                    if data is None:
                        raise Unavailable(f"chunk {key} could not be refetched")
                else:
                    data = await asyncio.shield(inner)
                if not fut.done():
                    fut.set_result(data)
            except BaseException as e:
                self.settle(key)
                if not fut.done():
                    if isinstance(e, Exception):
                        fut.set_exception(e)
                    else:
                        fut.set_exception(LayerClosed(f"layer {self.digest} closed: {e!r}"))
                if not isinstance(e, Exception):
                    raise

        self.spawn(run())
        return fut

    def overtake(self, row: int) -> bool:
        """Fetch ``row``'s member now, from the blob itself, if its chunks wait in a fetch
        that has not started (a prefetch piece queued behind others, or behind a head
        start's download of the pieces before it). The queued fetch later skips what this
        delivered. Returns whether a fetch started. Members over OVERTAKE_MAX_BYTES, and
        more than OVERTAKE_PARALLEL at a time, wait their turn: the prefetch itself is the
        cheaper way to get them."""
        idx = self.index
        key = idx.keys[row]
        if key not in self._queued or self._overtaking >= OVERTAKE_PARALLEL or self.closed:
            return False
        m = idx.row_member[row]
        end = self._fetch_end(m)
        if end - idx.m_start[m] > OVERTAKE_MAX_BYTES:
            return False
        job = []
        for r in idx.member_rows(m):
            k = idx.keys[r]
            fut = self.owned_future(k)
            if k in self._queued and fut is not None and not fut.done():
                job.append((r, k))
        self._queued.difference_update(k for _, k in job)
        if not job:
            return False
        self._overtaking += 1
        self.metrics.overtakes += 1
        blob = self.blob
        if isinstance(blob, HeadStartBlob) and not blob.has(idx.m_start[m], end - idx.m_start[m]):
            blob = blob.blob  # (bytes already in a head piece are read from there)
        task = self.spawn(
            self._run_fetch(
                [(idx.m_start[m], end)],
                [job],
                "demand",
                True,
                frozenset([key]),
                overtake_from=blob,
            )
        )

        def done(_: asyncio.Task[Any]) -> None:
            self._overtaking -= 1

        task.add_done_callback(done)
        return True

    # --- one fetch -----------------------------------------------------------------------

    def _fail(self, jobs: list[list[tuple[int, str]]], exc: BaseException) -> None:
        self._queued.difference_update(k for job in jobs for _, k in job)
        for job in jobs:
            for _, k in job:
                fut = self.settle(k)
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
        overtake_from: Blob | None = None,
    ) -> BaseException | None:
        """Fetch ``ranges`` and deliver ``jobs``' chunks; on failure the jobs' futures fail,
        except an overtaking fetch's (reading ``overtake_from``): the fetch it overtook
        still delivers them."""
        demand = kind == "demand"
        if demand:
            self.scheduler.begin()
        try:
            try:
                async with gate or contextlib.nullcontext():
                    if gate is not None:  # started: no read fetches ahead of it any more
                        self._queued.difference_update(k for job in jobs for _, k in job)
                    datas = await asyncio.wait_for(
                        (overtake_from or self.blob).read_ranges([(s, e - s) for s, e in ranges]),
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
                err = Unavailable(f"fetching layer {self.digest} failed: {e}")
                self.metrics.note_error(f"fetching {len(ranges)} range(s) failed: {e}")
                if overtake_from is None:
                    self._fail(jobs, err)
                return err
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
            await self.delivery.deliver(datas, ranges, jobs, wanted, to_memory)
            return None
        except BaseException as e:
            self._fail(jobs, LayerClosed(f"fetch of layer {self.digest} stopped: {e!r}"))
            raise
        finally:
            if demand:
                self.scheduler.end(read=True)


__all__ = ["Fetcher", "LayerClosed", "compressed_bound"]
