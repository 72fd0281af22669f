"""Opening a layer: its footer and TOC (from the disk cache or the blob), verified and indexed.

A layer seen for the first time (its TOC came from the source, so its chunks are not
cached either) starts downloading its prefetch range while the TOC is still being parsed
(`stargz.fs.headstart`): `_HeadStart` waits for the landmark offset the parse reports
and starts the download on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from stargz.errors import ChunkError, StargzError, TOCError
from stargz.estargz.footer import parse_footer
from stargz.estargz.reader import Reader
from stargz.fs.cache import DiskCache
from stargz.fs.chunks import ChunkIndex
from stargz.fs.headstart import (
    TOC_HEAD_BYTES,
    HeadStartBlob,
    landmark_from_toc_head,
    landmark_offset,
)
from stargz.fs.options import FsOptions
from stargz.fs.source import Blob

log = logging.getLogger("stargz.fs")

#: First read of a blob: its last bytes, which usually hold the footer and the whole TOC.
TAIL_FETCH_SIZE = 64 << 10
#: A prefetch is fetched in pieces of this many bytes (cut at member boundaries), at most
#: PREFETCH_PARALLEL at a time, when ``prefetch_chunk_size`` is 0 (Go: one request): the
#: first pieces decode while the next download. Measured on the HelloBench gcc image
#: (23 MB prefetch, 10 ms RTT, 200 Mbit/s): create 1.15 -> 1.05 s.
PREFETCH_PIECE = 2 << 20
PREFETCH_PARALLEL = 4
#: A prefetch up to this size is streamed (`head_start_streams` requests, each for a run of
#: consecutive pieces handed over as they arrive), not sent as one request per piece: 4
#: piece requests at a time made 4 of 12 python prefetches (5 MB, 10 ms RTT, 200 Mbit/s)
#: 0.1 s slower, each request a round trip of its own. Two streams rather than one leave
#: TCP slow start sooner (HelloBench at 50 ms RTT: python and nginx 0.05 s sooner, the
#: same at 20 ms). Bigger prefetches keep 4 requests of one piece at a time (gcc, 23 MB:
#: 1.16 s with 1, 1.04 with 4).
PREFETCH_ONE_FLOW_MAX = 8 << 20


async def fetch_tail(
    blob: Blob,
    digest: str,
    disk: DiskCache | None,
    loop_executor: Executor,
    max_toc_bytes: int = 0,
    on_toc_head: Callable[[bytes], None] | None = None,
) -> tuple[int, bytes, int]:
    """``(start, bytes[start:size], fetched)``: the blob from the TOC's start to its end.

    ``fetched`` is how many bytes came from the blob (0 when the disk cache had them).
    The blob's last bytes that its opening already fetched (``take_tail()``, see
    :class:`~stargz.fs.source.Blob`) are used instead of asking for them again. A TOC
    region (TOC offset to the blob's end) over ``max_toc_bytes`` (0: no bound) is
    refused with TOCError before any of it beyond the first tail read is fetched.
    ``on_toc_head`` gets the TOC region's first `TOC_HEAD_BYTES` as soon as they are here
    (fetched from the blob only: not for a TOC from the disk cache).
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
    toc_region = size - footer.toc_offset
    if max_toc_bytes and toc_region > max_toc_bytes:
        raise TOCError(
            f"layer {digest}: the TOC region is {toc_region} bytes (TOC offset "
            f"{footer.toc_offset} of a {size}-byte blob), more than the {max_toc_bytes} "
            "allowed (max_toc_bytes)"
        )
    if footer.toc_offset < start:
        off, n = footer.toc_offset, start - footer.toc_offset
        streaming = getattr(blob, "read_at_with_head", None)
        if on_toc_head is not None and streaming is not None:
            head = await streaming(off, n, TOC_HEAD_BYTES, on_toc_head)
        else:
            (head,) = await blob.read_ranges([(off, n)])
        return footer.toc_offset, head + tail, len(head) + len(tail)
    region = tail[footer.toc_offset - start :]
    if on_toc_head is not None:
        on_toc_head(region[:TOC_HEAD_BYTES])
    return footer.toc_offset, region, len(tail)


class _TailBytes:
    """The reader's ``read_at`` over the fetched tail, for the parse only.

    The reader keeps its read_at; the tail (the whole compressed TOC) must not stay
    alive with it: the layer reads chunks through the blob, never the reader. `drop`
    lets go of the bytes once the parse is over.
    """

    def __init__(self, start: int, data: bytes, size: int) -> None:
        self._start, self._data, self._size = start, data, size

    def drop(self) -> None:
        self._data = None

    def __call__(self, off: int, n: int) -> bytes:
        data, start = self._data, self._start
        if data is None:
            raise ChunkError("the layer's reader holds no blob bytes once opened")
        if off < start or off + n > self._size:
            raise ChunkError(f"read [{off}, +{n}) outside the fetched tail [{start}, {self._size})")
        return data[off - start : off - start + n]


def _head_start_blob(blob: Blob, n: int, streams: int) -> HeadStartBlob:
    """``blob`` with its first ``n`` bytes downloading as the prefetch would fetch them:
    streamed up to PREFETCH_ONE_FLOW_MAX, PREFETCH_PARALLEL pieces at a time above."""
    parallel = 1 if n <= PREFETCH_ONE_FLOW_MAX else PREFETCH_PARALLEL
    return HeadStartBlob(blob, n, PREFETCH_PIECE, parallel, streams)


class _HeadStart:
    """Starts the prefetch range's download as soon as the parse reports its landmark."""

    def __init__(
        self, blob: Blob, max_bytes: int, loop: asyncio.AbstractEventLoop, streams: int = 1
    ) -> None:
        self._blob, self._max, self._loop, self._streams = blob, max_bytes, loop, streams
        self._offset: int | None = None
        self.blob: HeadStartBlob | None = None

    def on_toc_json(self, toc_json: bytes) -> None:
        """Parse hook; runs in the executor thread."""
        if self._offset is not None:
            return  # found in the TOC's first bytes already
        off = landmark_offset(toc_json)
        if off:
            self._offset = off
            self._loop.call_soon_threadsafe(self.start)

    def on_toc_head(self, region_head: bytes) -> None:
        """`fetch_tail` hook, on the loop: the TOC region's first bytes, while the rest
        is still on its way. The download starts now if they name the landmark."""
        off = landmark_from_toc_head(region_head)
        if off:
            self._offset = off
            self.start()

    def start(self) -> None:
        if self._offset is not None and self.blob is None:
            n = min(self._offset, self._max)
            self.blob = _head_start_blob(self._blob, n, self._streams)

    def cancel(self) -> None:
        self._offset = None
        if self.blob is not None:
            self.blob.release()


def neighbour_head_start(
    blob: Blob, region: bytes, max_bytes: int, streams: int = 1
) -> HeadStartBlob | None:
    """A neighbour layer's head start (`stargz.fs.neighbours`): once its TOC region is in,
    its prefetch range starts downloading, if the region's first bytes name the landmark
    and the range is streamed (at most PREFETCH_ONE_FLOW_MAX bytes; bigger
    ones wait for the layer's own mount). None when nothing was started."""
    off = landmark_from_toc_head(region[:TOC_HEAD_BYTES])
    if not off or min(off, max_bytes) > PREFETCH_ONE_FLOW_MAX:
        return None
    return _head_start_blob(blob, min(off, max_bytes), streams)


@dataclass
class OpenedLayer:
    """What opening produced: the blob to read chunks through (maybe with a head start
    under way), the parsed reader, its chunk index, and what it cost."""

    blob: Blob
    reader: Reader
    index: ChunkIndex
    tail_bytes: int
    fetch_seconds: float
    parse_seconds: float


def _build(
    start: int,
    data: bytes,
    size: int,
    toc_digest: str | None,
    verify: bool,
    on_toc_json: object = None,
) -> Reader:
    tail = _TailBytes(start, data, size)
    try:
        return Reader(
            tail,
            size,
            toc_digest=toc_digest,
            verify=verify,
            tail_size=size - start,
            keep_toc=False,
            on_toc_json=on_toc_json,
        )
    finally:
        tail.drop()


async def open_layer(
    digest: str,
    blob: Blob,
    *,
    toc_digest: str | None,
    verify: bool,
    options: FsOptions,
    disk: DiskCache,
    executor: Executor,
    cache_scope: str = "",
    tail: tuple[int, bytes, int] | None = None,
) -> OpenedLayer:
    """Fetch the footer and TOC (or take them from the disk cache), verify, index.

    Raises FooterError/TOCError for a blob that is not eStargz (or whose TOC is bigger
    than ``options.max_toc_bytes``), DigestMismatch when the TOC does not hash to
    ``toc_digest``. ``cache_scope`` keeps unverified chunks of different sources apart.
    ``tail`` is what `fetch_tail` answered earlier (a neighbour layer pre-resolved by
    another layer's mount, `stargz.fs.neighbours`): used instead of fetching again.
    """
    t0 = time.monotonic()
    loop = asyncio.get_running_loop()
    max_toc = options.max_toc_bytes
    head = _HeadStart(blob, options.head_start_max_bytes, loop, options.head_start_streams)
    allowed = (
        not options.noprefetch
        and options.head_start_max_bytes > 0
        and not isinstance(blob, HeadStartBlob)  # (a neighbour's, started already)
    )
    if tail is not None:
        start, data, fetched = tail
    else:
        try:
            start, data, fetched = await fetch_tail(
                blob, digest, disk, executor, max_toc, head.on_toc_head if allowed else None
            )
        except BaseException:
            head.cancel()  # the TOC's first bytes may have started it
            raise
    t_fetched = time.monotonic()
    size = blob.size
    wanted = fetched and allowed
    hook = head.on_toc_json if wanted else None
    try:
        try:
            reader = await loop.run_in_executor(
                executor, _build, start, data, size, toc_digest, verify, hook
            )
        except (StargzError, ValueError):
            if fetched:
                raise
            # a stale or damaged cached tail: forget it and go to the source
            start, data, fetched = await fetch_tail(blob, digest, None, executor, max_toc)
            reader = await loop.run_in_executor(
                executor, _build, start, data, size, toc_digest, verify
            )
        head.start()  # (normally done already, by the callback the parse queued)
        if fetched:
            try:
                await loop.run_in_executor(executor, disk.write_tail, digest, start, size, data)
            except OSError as e:
                log.warning("cannot cache the TOC of %s: %s", digest, e)
        index = await loop.run_in_executor(executor, ChunkIndex, reader, digest, cache_scope)
    except BaseException:
        head.cancel()
        raise
    total = time.monotonic() - t0
    return OpenedLayer(
        blob=head.blob or blob,
        reader=reader,
        index=index,
        tail_bytes=fetched,
        fetch_seconds=t_fetched - t0,
        parse_seconds=total - (t_fetched - t0),
    )


__all__ = ["OpenedLayer", "TAIL_FETCH_SIZE", "fetch_tail", "neighbour_head_start", "open_layer"]
