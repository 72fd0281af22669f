"""Head start: download a layer's prefetch range while its TOC is still being parsed.

Opening a layer is fetch tail -> parse TOC -> start prefetch. For an optimized image the
parse (json, index) takes ~60-120 ms of CPU, and the prefetch (a few MB at 200 Mbit/s)
is the longest step before the container can start. The prefetch range is
``[0, offset of .prefetch.landmark)``, and that offset can be read from the TOC JSON with
a byte search long before the parse ends. `landmark_offset` finds it; `HeadStartBlob`
downloads that range in pieces, as many at a time as the prefetch itself would (up to
8 MiB ``head_start_streams`` requests, each for a run of consecutive pieces handed over as
they arrive, then 4 requests of one piece at a time),
and answers reads that fall inside it from those pieces.

The pieces are plain bytes of the blob: whatever uses them still decodes and verifies
every chunk against its TOC digest, so a wrong hint costs bytes, never correctness. A
piece that fails is fetched again by the reader that needs it, through the real blob.
"""

from __future__ import annotations

import asyncio
import logging
import re
import zlib
from collections.abc import Sequence
from typing import Any

from stargz.estargz.toc import PREFETCH_LANDMARK
from stargz.fs.source import Blob

log = logging.getLogger("stargz.fs")

_NAME = re.compile(rb'"name"\s*:\s*"' + re.escape(PREFETCH_LANDMARK.encode()) + rb'"')
_OFFSET = re.compile(rb'"offset"\s*:\s*(\d{1,19})\s*[,}]')


def landmark_offset(toc_json: bytes) -> int | None:
    """The ``offset`` of the TOC entry named ``.prefetch.landmark``, read from the raw JSON
    (no parse), or None when there is no such entry or its object is not the plain one the
    converters write (then the prefetch simply starts after the parse, as before)."""
    m = _NAME.search(toc_json)
    if m is None or _NAME.search(toc_json, m.end()) is not None:
        return None
    start = toc_json.rfind(b"{", 0, m.start())
    end = toc_json.find(b"}", m.end())
    if start < 0 or end < 0:
        return None
    obj = toc_json[start : end + 1]
    if obj.count(b"{") != 1:  # nested object (xattrs) or a brace inside a string: don't guess
        return None
    offsets = _OFFSET.findall(obj)
    if len(offsets) != 1:
        return None
    return int(offsets[0])


#: The first bytes of a TOC region fetched apart, to find the landmark early. The
#: converters put the prefetched files' entries first, so the landmark's entry is near the
#: start of the TOC: within the first 4 KiB (compressed) of every HelloBench image, 8 KiB
#: for gcc (500 KB TOC regions). A landmark further in is found by the full parse, as before.
TOC_HEAD_BYTES = 16 << 10
#: Decompressed bytes looked at, at most (a TOC head of zeros cannot make us allocate more).
_TOC_HEAD_JSON_MAX = 1 << 20


def landmark_from_toc_head(region_head: bytes) -> int | None:
    """`landmark_offset` from the first bytes of a layer's TOC region (a gzip member
    holding the ``stargz.index.json`` tar entry), or None: not gzip (zstd:chunked), not
    decodable, or no whole landmark entry in what the head holds. Being a prefix, it
    cannot rule out a second landmark entry later: a wrong guess costs bytes only."""
    if region_head[:2] != b"\x1f\x8b":
        return None
    try:
        raw = zlib.decompressobj(31).decompress(region_head, _TOC_HEAD_JSON_MAX)
    except zlib.error:
        return None
    return landmark_offset(raw)


def _stop(pieces: list[asyncio.Future[bytes]], error: Exception) -> None:
    """A failed head download: its pieces not yet here fail with ``error``, so the readers
    waiting for them go to the blob itself."""
    log.info("head start stopped: %s", error)
    for f in pieces:
        if not f.done():
            f.set_exception(error)
            f.exception()  # retrieved: no "never retrieved" warning


class HeadStartBlob:
    """``blob`` with its bytes ``[0, size)`` downloading in the background from now on.

    `read_ranges` answers ranges that lie inside the head from the downloaded pieces
    (waiting for them if needed) and sends the others to ``blob``. `release` drops the
    pieces (call it once the prefetch has taken them); after it every read goes to
    ``blob``. Everything else is ``blob``'s.
    """

    def __init__(
        self, blob: Blob, size: int, piece: int, parallel: int = 1, streams: int = 1
    ) -> None:
        self.blob = blob
        self.head_size = max(0, min(size, blob.size))
        self.piece = max(1, piece)
        loop = asyncio.get_running_loop()
        n = -(-self.head_size // self.piece)
        self._pieces: list[asyncio.Future[bytes]] | None = [loop.create_future() for _ in range(n)]
        self._next = 0
        self.fetched = 0
        if parallel <= 1 and n > 1 and hasattr(blob, "read_at_streaming"):
            # one GET per stream, each for a run of consecutive pieces: no round trip
            # between pieces; more than one stream ramps up faster out of TCP slow start
            k = max(1, min(streams, n))
            cuts = [n * i // k for i in range(k + 1)]
            self._tasks = [
                loop.create_task(self._stream(self._pieces, cuts[i], cuts[i + 1])) for i in range(k)
            ]
        else:
            self._tasks = [
                loop.create_task(self._download(self._pieces))
                for _ in range(max(1, min(parallel, n)))
            ]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.blob, name)

    @property
    def size(self) -> int:
        return self.blob.size

    async def _stream(self, pieces: list[asyncio.Future[bytes]], first: int, end: int) -> None:
        """One worker, one request for pieces ``[first, end)``: each piece is handed over
        as soon as it is in."""
        start = first * self.piece
        stop = min(end * self.piece, self.head_size)
        mine = pieces[first:end]

        def arrived(pos: int, data: bytes) -> None:
            fut = pieces[(start + pos) // self.piece]
            if not fut.done():
                self.fetched += len(data)
                fut.set_result(data)

        try:
            await self.blob.read_at_streaming(start, stop - start, self.piece, arrived)
            if not all(f.done() for f in mine):
                raise OSError(f"short read of bytes {start}-{stop - 1}")
        except asyncio.CancelledError:
            for f in mine:
                f.cancel()
            raise
        except Exception as e:
            _stop(mine, e)

    async def _download(self, pieces: list[asyncio.Future[bytes]]) -> None:
        """One worker: takes the next piece not taken yet, in blob order."""
        while self._next < len(pieces):
            i = self._next
            self._next += 1
            fut = pieces[i]
            off = i * self.piece
            n = min(self.piece, self.head_size - off)
            try:
                (data,) = await self.blob.read_ranges([(off, n)])
                if len(data) != n:
                    raise OSError(f"short read of bytes {off}-{off + n - 1}")
            except asyncio.CancelledError:
                fut.cancel()
                raise
            except Exception as e:
                self._next = len(pieces)  # the other workers stop too
                _stop(pieces[i:], e)
                return
            self.fetched += n
            if not fut.done():
                fut.set_result(data)

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        pieces = self._pieces
        if pieces is None or not ranges:
            return await self.blob.read_ranges(ranges)
        head = self.head_size
        out: list[bytes | None] = [None] * len(ranges)
        rest: list[tuple[int, int, int]] = []  # (index in ranges, offset, length) for the blob
        for j, (off, n) in enumerate(ranges):
            if n > 0 and 0 <= off < head:
                inside = min(n, head - off)
                out[j] = await self._from_head(pieces, off, inside)
                if out[j] is not None and inside < n:
                    rest.append((j, head, off + n - head))  # the part past the head
                    continue
            if out[j] is None:
                rest.append((j, off, n))
        if rest:
            got = await self.blob.read_ranges([(o, n) for _, o, n in rest])
            for (j, _, _), data in zip(rest, got, strict=True):
                prev = out[j]
                out[j] = data if prev is None else prev + data
        return out  # type: ignore[return-value]

    def has(self, off: int, n: int) -> bool:
        """Whether ``[off, off+n)`` lies in pieces that are here already."""
        pieces = self._pieces
        if pieces is None or n <= 0 or off < 0 or off + n > self.head_size:
            return False
        for i in range(off // self.piece, (off + n - 1) // self.piece + 1):
            f = pieces[i]
            if not f.done() or f.cancelled() or f.exception() is not None:
                return False
        return True

    async def _from_head(
        self, pieces: list[asyncio.Future[bytes]], off: int, n: int
    ) -> bytes | None:
        """``[off, off+n)`` from the pieces, or None if one of them failed."""
        first, last = off // self.piece, (off + n - 1) // self.piece
        parts = []
        for i in range(first, last + 1):
            try:
                parts.append(await asyncio.shield(pieces[i]))
            except asyncio.CancelledError:
                if pieces[i].cancelled():  # released meanwhile: not our caller's cancel
                    return None
                raise
            except Exception:
                return None
        base = first * self.piece
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if off == base and n == len(data):
            return data
        return data[off - base : off - base + n]

    def release(self) -> None:
        """Stop the download and drop the pieces; reads go to the blob from now on."""
        pieces, self._pieces = self._pieces, None
        for t in self._tasks:
            t.cancel()
        if pieces:
            for fut in pieces:
                fut.cancel()

    async def close(self) -> None:
        self.release()
        closer = getattr(self.blob, "close", None)
        if closer is not None:
            res = closer()
            if asyncio.iscoroutine(res):
                await res
