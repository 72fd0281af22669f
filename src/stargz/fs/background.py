"""Prefetch and background fetch of a layer.

Prefetch fetches the members before the prefetch offset (the ``.prefetch.landmark``) in
pieces of ``PREFETCH_PIECE`` bytes; background fetch walks the rest at low priority (see
:mod:`stargz.fs.scheduler`), pausing while the cache writer is behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_right
from typing import Any

from stargz.fs import memory
from stargz.fs.chunks import FetchedSize
from stargz.fs.fetch import Fetcher
from stargz.fs.headstart import HeadStartBlob
from stargz.fs.layer_open import PREFETCH_ONE_FLOW_MAX, PREFETCH_PARALLEL, PREFETCH_PIECE

log = logging.getLogger("stargz.fs")


class BackgroundFetch:
    """Runs a layer's prefetch, then its background fetch, as tasks of ``fetcher``."""

    def __init__(self, fetcher: Fetcher, fetched: FetchedSize, layer_size: int) -> None:
        self.fetcher = fetcher
        self._fetched = fetched
        self._size = layer_size
        self.prefetch_done = asyncio.Event()
        self.prefetch_size = 0

    def start_prefetch(self, size: int, layer_size: int) -> asyncio.Task[Any]:
        self.prefetch_size = min(max(size, 0), layer_size)
        return self.fetcher.spawn(self._prefetch(self.prefetch_size))

    async def _prefetch(self, size: int) -> None:
        f = self.fetcher
        t0 = time.monotonic()
        try:
            if size <= 0:
                return
            async with f.scheduler.prioritized():
                last = bisect_right(f.index.m_start, size - 1)
                members = [m for m in range(last) if f.member_missing(m)]
                tasks: list[asyncio.Task[Any]] = []
                f.start_fetch(
                    members,
                    "prefetch",
                    to_memory=True,
                    max_range=f.options.prefetch_chunk_size or PREFETCH_PIECE,
                    gate=asyncio.Semaphore(
                        1 if size <= PREFETCH_ONE_FLOW_MAX else PREFETCH_PARALLEL
                    ),
                    tasks=tasks,
                )
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
            log.info(
                "prefetch done",
                extra={
                    "layer": f.digest,
                    "bytes": f.metrics.prefetch_bytes,
                    "seconds": round(time.monotonic() - t0, 4),
                },
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("prefetch of layer %s failed", f.digest)
        finally:
            f.metrics.prefetch_seconds = time.monotonic() - t0
            self.prefetch_done.set()
            if isinstance(f.blob, HeadStartBlob):
                f.blob.release()  # the prefetch has what it started; drop the rest

    def start_background_fetch(self) -> asyncio.Task[Any]:
        return self.fetcher.spawn(self._background())

    async def _background(self) -> None:
        f = self.fetcher
        idx = f.index
        await self.prefetch_done.wait()
        step = max(f.options.background_request_bytes, 1)
        m = 0
        try:
            while m < idx.n_members and not f.closed:
                batch: list[int] = []
                nbytes = 0
                while m < idx.n_members and nbytes < step:
                    if f.member_missing(m):
                        batch.append(m)
                        nbytes += idx.m_end[m] - idx.m_start[m]
                    elif batch:
                        m += 1
                        break
                    m += 1
                if not batch:
                    continue
                await f.delivery.backlog_ok.wait()
                async with f.scheduler.background():
                    if f.closed:
                        return
                    tasks: list[asyncio.Task[Any]] = []
                    f.start_fetch(batch, "background", to_memory=False, tasks=tasks)
                    if tasks:
                        got = await asyncio.wait_for(
                            asyncio.gather(*tasks, return_exceptions=True),
                            f.options.background_timeout_sec,
                        )
                        failed = [g for g in got if isinstance(g, BaseException)]
                        if len(failed) == len(got):
                            # the source is gone: reads will say so; don't hammer it
                            log.warning(
                                "background fetch stopped: %s",
                                failed[0],
                                extra={"layer": f.digest},
                            )
                            return
            # let the last writes land before judging completeness
            while f.busy and not f.closed:
                await asyncio.sleep(0.01)
            if not f.closed and self._fetched.value() == self._size:
                log.info("layer fully fetched", extra={"layer": f.digest})
            if not f.closed:
                await asyncio.get_running_loop().run_in_executor(f.executor, memory.trim)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background fetch of layer %s failed", f.digest)


__all__ = ["BackgroundFetch"]
