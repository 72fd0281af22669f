"""Pre-resolving the other layers of an image while containerd prepares the first one.

containerd prepares an image's layers one after the other, and each remote Prepare of
ours waits for its blob to be resolved and its footer + TOC to come from the registry: a
few round trips per layer, paid N times in a row. The labels of the first Prepare
(``cri.image-layers`` / ``stargz.layers``, SPEC §7.4) already name every layer, so, as
the Go snapshotter does (``fs/fs.go`` Mount: "resolve and cache other layers in
parallel"), the first Prepare starts resolving and fetching the TOC of the others; their
own Prepare then takes what is there (or waits for the fetch under way) instead of
asking the registry again.

This module is the bookkeeping only, with the fetch passed in (`NeighbourFetch`):

- deduplicated: one entry per (repository, digest); a layer that is open, being opened,
  or already has an entry is not fetched again;
- bounded: at most ``parallel`` fetches at a time, in the order the label lists the
  layers (the next layer containerd prepares first);
- handed over once (`take`), waiting for a fetch under way; a fetch still queued behind
  others is cancelled instead (the mount is quicker doing it itself);
- bounded in memory: what a layer never mounted holds (its TOC region, and the pieces of
  its prefetch range when the fetch started downloading it: `Prefetched.head_bytes`) is
  released after ``hold_sec``, and a result that would make the held bytes exceed
  ``max_bytes`` is dropped at once;
- cancelled on `close`.

A fetch that fails (a digest the repository does not have, an unreachable registry) is
logged; the failure is remembered for ``hold_sec`` so the later Prepares of the same image,
whose labels name the digest again, do not ask again. The layer's own Prepare resolves it
as if nothing happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from stargz.fs.metrics import FsMetrics
from stargz.fs.source import Blob

log = logging.getLogger("stargz.fs")

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")

#: A layer key: (source repository, layer digest), as the filesystem's layer table.
Key = tuple[str, str]

#: At most this many layers of one label are looked at (containerd trims the label to
#: 4 KiB, about 55 digests; a hand-made Prepare is not trusted to).
MAX_PER_LABEL = 128


@dataclass
class Prefetched:
    """A neighbour layer's resolved blob and the bytes from its TOC's start to its end
    (``fetch_tail``'s answer): ``fetched`` of them came from the blob (0: disk cache)."""

    blob: Blob
    start: int
    data: bytes
    fetched: int
    #: Bytes of its prefetch range already downloading (`blob` is then a HeadStartBlob).
    head_bytes: int = 0

    @property
    def held(self) -> int:
        """What holding it costs: the TOC region, and at most the head start's pieces."""
        return len(self.data) + self.head_bytes

    @property
    def tail(self) -> tuple[int, bytes, int]:
        return self.start, self.data, self.fetched


#: Resolves one layer and fetches its footer and TOC: ``(image ref, digest, labels)``.
NeighbourFetch = Callable[[str, str, Mapping[str, str]], Awaitable[Prefetched]]


@dataclass(eq=False)
class _Entry:
    key: Key
    task: asyncio.Task[Prefetched | None] | None = None
    started: bool = False
    result: Prefetched | None = None
    failed: bool = False
    expiry: asyncio.TimerHandle | None = None


class Neighbours:
    """The pre-resolved neighbour layers of the images being pulled (see the module doc)."""

    def __init__(
        self,
        fetch: NeighbourFetch,
        metrics: FsMetrics,
        *,
        parallel: int,
        hold_sec: float,
        max_bytes: int,
    ) -> None:
        self._fetch = fetch
        self.metrics = metrics
        self.parallel = max(1, parallel)
        self.hold_sec = hold_sec
        self.max_bytes = max_bytes
        self._entries: dict[Key, _Entry] = {}
        self._sem: asyncio.Semaphore | None = None
        self._closed = False
        #: Bytes of TOC regions held for layers not taken yet.
        self.held_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def start(
        self,
        source: str,
        ref: str,
        digests: Sequence[str],
        labels: Mapping[str, str],
        skip: Callable[[Key], bool],
    ) -> int:
        """Start fetching each of ``digests`` (of ``source``'s image ``ref``) that has no
        entry and for which ``skip`` is false; returns how many were started."""
        if self._closed:
            return 0
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.parallel)
        loop = asyncio.get_running_loop()
        started = 0
        for digest in digests[:MAX_PER_LABEL]:
            key = (source, digest)
            if key in self._entries or skip(key):
                continue
            if not _DIGEST_RE.match(digest):
                log.info(
                    "not pre-resolving a neighbour layer: not a sha256 digest",
                    extra={"layer": digest[:100], "ref": ref},
                )
                continue
            entry = _Entry(key)
            self._entries[key] = entry
            entry.task = loop.create_task(
                self._run(entry, ref, labels), name=f"stargz-neighbour-{digest[7:19]}"
            )
            started += 1
        self.metrics.neighbour_fetches += started
        return started

    async def _run(self, entry: _Entry, ref: str, labels: Mapping[str, str]) -> Prefetched | None:
        assert self._sem is not None
        digest = entry.key[1]
        async with self._sem:
            entry.started = True
            t0 = time.monotonic()
            log.debug("pre-resolving a neighbour layer", extra={"layer": digest, "ref": ref})
            try:
                got = await self._fetch(ref, digest, labels)
            except asyncio.CancelledError:
                self._forget(entry)
                raise
            except Exception as e:
                self.metrics.neighbour_failures += 1
                if self._entries.get(entry.key) is entry:
                    entry.failed = True
                    entry.expiry = asyncio.get_running_loop().call_later(
                        self.hold_sec, self._forget, entry
                    )
                log.info(
                    "cannot pre-resolve a neighbour layer; its own mount will try",
                    extra={"layer": digest, "ref": ref, "error": str(e)},
                )
                return None
        log.debug(
            "pre-resolved a neighbour layer",
            extra={
                "layer": digest,
                "ref": ref,
                "toc_bytes": len(got.data),
                "fetched": got.fetched,
                "seconds": round(time.monotonic() - t0, 4),
            },
        )
        if self._entries.get(entry.key) is not entry:
            return got  # taken (someone awaits this task) or closed meanwhile
        if self.held_bytes + got.held > self.max_bytes:
            self._forget(entry)
            self.metrics.neighbour_dropped += 1
            await _close_blob(got.blob)
            log.info(
                "dropped a pre-resolved neighbour TOC: over the byte bound",
                extra={"layer": digest, "bytes": got.held, "max_bytes": self.max_bytes},
            )
            return None
        entry.result = got
        self.held_bytes += got.held
        entry.expiry = asyncio.get_running_loop().call_later(self.hold_sec, self._expire, entry)
        return got

    def _forget(self, entry: _Entry) -> Prefetched | None:
        """Take ``entry`` off the table; returns (and no longer counts) what it held."""
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        if entry.expiry is not None:
            entry.expiry.cancel()
            entry.expiry = None
        got, entry.result = entry.result, None
        if got is not None:
            self.held_bytes -= got.held
        return got

    def _expire(self, entry: _Entry) -> None:
        got = self._forget(entry)
        if got is None:
            return
        self.metrics.neighbour_expired += 1
        log.debug(
            "released a pre-resolved neighbour TOC nobody mounted",
            extra={"layer": entry.key[1], "held_seconds": self.hold_sec},
        )
        closer = getattr(got.blob, "close", None)
        if closer is not None:
            res = closer()
            if asyncio.iscoroutine(res):
                asyncio.get_running_loop().create_task(res)

    async def take(self, key: Key) -> Prefetched | None:
        """What was pre-resolved for ``key`` (waiting for a fetch under way), handed over
        once; None when there is nothing (the caller resolves the layer itself)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        got = self._forget(entry)
        if entry.failed:
            return None
        if got is not None:
            self.metrics.neighbour_hits += 1
            return got
        assert entry.task is not None
        if not entry.started:
            entry.task.cancel()  # still queued behind other fetches: quicker to do it now
            return None
        try:
            got = await asyncio.shield(entry.task)
        except (asyncio.CancelledError, Exception):
            if entry.task.cancelled() or entry.task.done():
                return None
            raise  # (the caller itself was cancelled)
        if got is not None:
            self.metrics.neighbour_hits += 1
        return got

    async def close(self) -> None:
        """Cancel what is under way and release what is held."""
        self._closed = True
        entries = list(self._entries.values())
        for e in entries:
            got = self._forget(e)
            if e.task is not None and not e.task.done():
                e.task.cancel()
            if got is not None:
                await _close_blob(got.blob)
        tasks = [e.task for e in entries if e.task is not None]
        if tasks:
            with contextlib.suppress(Exception):
                await asyncio.gather(*tasks, return_exceptions=True)


async def _close_blob(blob: Blob) -> None:
    closer = getattr(blob, "close", None)
    if closer is not None:
        res = closer()
        if asyncio.iscoroutine(res):
            await res


__all__ = ["NeighbourFetch", "Neighbours", "Prefetched"]
