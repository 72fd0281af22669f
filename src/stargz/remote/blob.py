"""Random access to one layer blob over HTTP ranges.

:class:`BlobReader` is what the filesystem reads chunks through. Its contract:

- ``read_at(offset, size)`` returns exactly the blob's bytes ``[offset, offset+size)``;
  a range past the end of the blob raises :class:`RangeNotSatisfiable` (never short
  data). Bytes are not verified here: the eStargz reader checks every chunk against its
  TOC digest.
- ``read_ranges([(offset, size), ...])`` fetches several ranges with ONE request
  (``Range: bytes=a-b,c-d``) when the server allows it. Ranges are sorted and merged
  first; more than :data:`MAX_RANGES_PER_REQUEST` are split over parallel requests.
- A server may answer a multi-range request with ``multipart/byteranges``, with one
  merged range, or with the whole blob (``200``). When it refuses (4xx other than 416),
  answers something unparsable, or ignores the ranges, its host is switched to
  single-range mode for the client's lifetime and the read is retried with single-range
  requests (nearby ranges, up to ``chunk_size`` apart, share one request). A ``200``
  body is read only as far as needed; the connection is then dropped.
- A registry that redirects blob GETs to storage is asked once (a probe GET, as Go
  does); the storage URL is reused for ``redirect_ttl`` seconds, and refreshed early
  when storage answers 401/403 (expired signature). The probe of :meth:`open` asks for
  the blob's last ``tail_probe_size`` bytes (``Range: bytes=-N``) and keeps them for
  :meth:`BlobReader.take_tail` (an eStargz footer, often the whole TOC); later probes
  ask ``bytes=0-0``.
- When the current host fails for good (after the client's retries), a mirror's blob
  moves to the next host: the next mirror, finally the registry. A blob served by a later
  host than the first tries the earlier ones again every ``valid_interval`` seconds (one
  probe, before a read): a mirror that is back takes the traffic again.
- Each read has a deadline of ``fetching_timeout_sec`` over all its requests.

``sync_read_at(loop)`` adapts it to the ``read_at(offset, size) -> bytes`` callable of
:class:`stargz.estargz.Reader`, for use from a worker thread.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from stargz.errors import (
    BlobNotFound,
    InvalidArgument,
    RangeMismatch,
    RangeNotSatisfiable,
    RegistryError,
    RegistryProtocolError,
    StargzError,
)
from stargz.remote.locate import TAIL_PROBE_SIZE, BlobLocation, probe_blob
from stargz.remote.multipart import (
    Part,
    Region,
    coalesce,
    extract,
    multipart_boundary,
    parse_byteranges,
    parse_content_range,
    range_header,
)
from stargz.remote.redact import redact_url
from stargz.remote.reference import Reference
from stargz.remote.stats import FetchStats
from stargz.remote.transport import Exchange, Transport, pull_scope

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Ranges per request; more are split over parallel requests (servers cap header size).
MAX_RANGES_PER_REQUEST = 64
#: Part headers of a multipart body are small; this bounds the body we accept.
_MULTIPART_OVERHEAD_PER_PART = 1024
#: ``(piece, callback)`` of a `BlobReader.read_at_streaming` under way in this task: its
#: single-range answer hands each ``piece`` bytes to ``callback`` as soon as they arrive.
_PIECE_HOOK: contextvars.ContextVar[tuple[int, Callable[[int, bytes], None]] | None] = (
    contextvars.ContextVar("stargz_blob_piece_hook", default=None)
)


class _StaleLocation(Exception):
    """A redirect target refused us (expired signature?): ask the registry again."""


class _MultiRangeRefused(Exception):
    """The server cannot do multi-range for us; go single-range on this host."""


async def _gather(coros: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """All results, or the first failure with the siblings cancelled."""
    if len(coros) == 1:
        return [await coros[0]]
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(c) for c in coros]
    except BaseExceptionGroup as eg:
        raise eg.exceptions[0] from None
    return [t.result() for t in tasks]


class BlobReader:
    """One blob of one repository, opened on the first host that serves it.

    Made by :meth:`stargz.remote.RegistryClient.open_blob` (``client`` is that client's
    transport); it does not own a connection, so there is
    nothing to close. ``stats`` counts this blob's traffic.
    """

    def __init__(
        self,
        client: Transport,
        ref: Reference,
        digest: str,
        size: int | None = None,
        *,
        redirect_ttl: float = 300.0,
        tail_probe_size: int = TAIL_PROBE_SIZE,
    ) -> None:
        """``redirect_ttl``: seconds a redirect target (a pre-signed storage URL) is reused
        before the registry is asked again. ``tail_probe_size``: how many of the blob's last
        bytes :meth:`open`'s probe fetches and keeps (:meth:`take_tail`); 0 probes
        ``bytes=0-0`` only."""
        if tail_probe_size < 0:
            raise InvalidArgument(f"tail_probe_size {tail_probe_size} is negative")
        self.client = client
        self.redirect_ttl = redirect_ttl
        self.tail_probe_size = tail_probe_size
        self.ref = ref
        self.digest = digest
        self.options = client.blob_options
        self.stats = FetchStats()
        self._expected_size = size
        self._loc: BlobLocation | None = None
        self._loc_expires = 0.0
        self._lock = asyncio.Lock()
        self._last_check_ok: float | None = None
        self._tail: tuple[int, bytes] | None = None
        #: When to probe the hosts before the current one again (None: on the first host).
        self._retry_first_at: float | None = None

    def __repr__(self) -> str:
        where = self._loc.host.netloc if self._loc else "unopened"
        return f"<BlobReader {self.ref.locator}@{self.digest[:19]} on {where}>"

    # --- where the bytes are -----------------------------------------------------------

    @property
    def size(self) -> int:
        return self._location_now().size

    @property
    def url(self) -> str:
        """The URL blob bytes are fetched from (a storage URL after a redirect)."""
        return self._location_now().url

    @property
    def location(self) -> BlobLocation:
        return self._location_now()

    @property
    def single_range(self) -> bool:
        """Whether reads use single-range requests (forced, or learned for this host)."""
        return self._single(self._location_now())

    def _location_now(self) -> BlobLocation:
        if self._loc is None:
            raise RuntimeError(f"{self!r} is not open")
        return self._loc

    async def open(self) -> None:
        """Find the first host (mirrors first) that serves the blob; keep its last
        ``tail_probe_size`` bytes if that host sent them with the probe."""
        await self._locate_from(0, tail=self.tail_probe_size)

    def take_tail(self) -> tuple[int, bytes] | None:
        """``(offset, bytes)``: the blob's last bytes as fetched by :meth:`open`'s probe,
        handed over once (the reader forgets them); None if there are none (any more)."""
        tail, self._tail = self._tail, None
        return tail

    async def _locate_from(self, start: int, *, tail: int = 0) -> BlobLocation:
        size = self._loc.size if self._loc is not None else self._expected_size

        async def probe(i: int, _host: object) -> tuple[BlobLocation, bytes | None]:
            return await probe_blob(
                self.client,
                self.ref,
                self.digest,
                host_index=i,
                size=size,
                stats=(self.stats,),
                tail=tail,
            )

        loc, data = await self.client.over_hosts(
            self.ref, f"blob {self.digest}", probe, start=start
        )
        if data is not None:
            self._tail = (loc.size - len(data), data)
        self._loc = loc
        now = time.monotonic()
        self._loc_expires = now + self.redirect_ttl if loc.redirected else float("inf")
        self._retry_first_at = now + self.options.valid_interval if loc.host_index else None
        if loc.redirected:
            log.debug("blob %s@%s redirects to %s", self.ref, self.digest, urlsplit(loc.url).netloc)
        return loc

    async def _location(self) -> BlobLocation:
        loc = self._location_now()
        now = time.monotonic()
        if self._retry_first_at is not None and now >= self._retry_first_at:
            await self._back_to_first(loc)
            loc = self._location_now()
        if loc.redirected and now >= self._loc_expires:
            await self._refresh(loc, next_host=False)
            loc = self._location_now()
        return loc

    async def _back_to_first(self, current: BlobLocation) -> None:
        """Probe from the first host again (a mirror that failed may be back); keep the
        current location if no host before it answers."""
        async with self._lock:
            if self._loc is not current or self._retry_first_at is None:
                return
            self._retry_first_at = time.monotonic() + self.options.valid_interval
            try:
                loc = await self._locate_from(0)
            except StargzError as e:
                log.info(
                    "blob %s@%s: earlier hosts still fail (%s); staying on %s",
                    self.ref,
                    self.digest,
                    e,
                    current.host.netloc,
                )
                self._loc = current
                self._retry_first_at = time.monotonic() + self.options.valid_interval
                return
            if loc.host_index < current.host_index:
                log.info(
                    "blob %s@%s: back on %s (was on %s)",
                    self.ref,
                    self.digest,
                    loc.host.netloc,
                    current.host.netloc,
                )

    async def _refresh(self, stale: BlobLocation, *, next_host: bool) -> None:
        """Re-probe (``next_host``: fail over past ``stale``'s host), once for all waiters."""
        async with self._lock:
            if self._loc is not stale:
                return  # another read already did it
            if next_host:
                self.stats.failovers += 1
                self.client.stats.failovers += 1
                log.info(
                    "blob %s@%s: %s failed, trying the next host",
                    self.ref,
                    self.digest,
                    stale.host.netloc,
                )
            await self._locate_from(stale.host_index + (1 if next_host else 0))

    def _single(self, loc: BlobLocation) -> bool:
        return (
            self.options.force_single_range_mode
            or urlsplit(loc.url).netloc in self.client.single_range_hosts
        )

    def _mark_single(self, loc: BlobLocation, why: str) -> None:
        netloc = urlsplit(loc.url).netloc
        self.stats.multi_range_fallbacks += 1
        self.client.stats.multi_range_fallbacks += 1
        if netloc not in self.client.single_range_hosts:
            self.client.single_range_hosts.add(netloc)
            log.info("%s: single-range mode from now on (%s)", netloc, why)

    # --- reads -------------------------------------------------------------------------

    async def read_at(self, offset: int, size: int) -> bytes:
        """The blob's bytes ``[offset, offset + size)``, exactly ``size`` of them."""
        return (await self.read_ranges([(offset, size)]))[0]

    async def read_at_streaming(
        self, offset: int, size: int, piece: int, on_piece: Callable[[int, bytes], None]
    ) -> bytes:
        """`read_at` in one request, handing each consecutive ``piece`` bytes (the last
        ones fewer) to ``on_piece(offset from `offset`, bytes)`` as soon as they are here,
        while the rest still streams in: one GET, with no round trip between pieces, whose
        first pieces can be used before the last arrive. ``on_piece`` runs on the event
        loop and may see a piece again if the read is retried; its errors are logged,
        never raised."""

        def hand(pos: int, data: bytes) -> None:
            try:
                on_piece(pos, data)
            except Exception:  # the caller's business, never the read's
                log.exception("piece callback of %s@%s failed", self.ref.locator, self.digest)

        token = _PIECE_HOOK.set((max(1, piece), hand))
        try:
            return await self.read_at(offset, size)
        finally:
            _PIECE_HOOK.reset(token)

    async def read_at_with_head(
        self, offset: int, size: int, head: int, on_head: Callable[[bytes], None]
    ) -> bytes:
        """`read_at`, handing the first ``head`` bytes to ``on_head`` as soon as they
        arrive (a TOC's first bytes name the prefetch range long before its last arrive);
        see `read_at_streaming`."""

        def first(pos: int, data: bytes) -> None:
            if pos == 0:
                on_head(data)

        return await self.read_at_streaming(offset, size, head, first)

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Bytes of each ``(offset, size)``, in the given order, fetched together.

        Every range must lie inside the blob (RangeNotSatisfiable otherwise): a short
        answer is never returned."""
        blob_size = self.size
        want: list[Region] = []
        for offset, size in ranges:
            if offset < 0 or size < 0:
                raise InvalidArgument(f"bad range (offset={offset}, size={size})")
            if offset + size > blob_size:
                raise RangeNotSatisfiable(
                    f"blob {self.ref.locator}@{self.digest}: bytes {offset}-{offset + size - 1} "
                    f"lie past its end ({blob_size} bytes)"
                )
            want.append((offset, offset + size))
        regions = coalesce(want)
        if not regions:
            return [b"" for _ in want]
        timeout = self.options.fetching_timeout_sec
        try:
            async with asyncio.timeout(timeout):
                got = await self._fetch(regions)
        except TimeoutError as e:
            raise RegistryError(
                f"blob {self.ref.locator}@{self.digest}: read not done after {timeout} s"
            ) from e
        starts = [s for s, _ in regions]
        out = []
        for s, e in want:
            if e <= s:
                out.append(b"")
                continue
            region = regions[bisect.bisect_right(starts, s) - 1]
            data = got[region]
            out.append(data if region == (s, e) else data[s - region[0] : e - region[0]])
        return out

    async def prefetch(self, offset: int, size: int, *, parallel: int = 4) -> bytes:
        """``read_at`` in GETs of at most ``prefetch_chunk_size`` bytes (0: one GET)."""
        piece = self.options.prefetch_chunk_size
        end = offset + size
        if piece <= 0 or end - offset <= piece:
            return await self.read_at(offset, size)
        sem = asyncio.Semaphore(parallel)

        async def one(o: int) -> bytes:
            async with sem:
                return await self.read_at(o, min(piece, end - o))

        return b"".join(await _gather([one(o) for o in range(offset, end, piece)]))

    async def _fetch(self, regions: list[Region]) -> dict[Region, bytes]:
        stale_refreshes = 0
        while True:
            loc = await self._location()
            try:
                return await self._fetch_at(loc, regions)
            except _StaleLocation as e:
                if stale_refreshes >= 1:
                    raise RegistryError(
                        f"blob {self.ref.locator}@{self.digest}: storage refuses "
                        f"{redact_url(loc.url)} even after asking the registry again",
                        url=redact_url(loc.url),
                    ) from e
                stale_refreshes += 1
                await self._refresh(loc, next_host=False)
            except (RegistryError, BlobNotFound):
                if loc.host_index >= len(self.client.hosts(self.ref)) - 1:
                    raise
                await self._refresh(loc, next_host=True)

    async def _fetch_at(self, loc: BlobLocation, regions: list[Region]) -> dict[Region, bytes]:
        if self._single(loc):
            return await self._fetch_single(loc, regions)
        batches = [
            regions[i : i + MAX_RANGES_PER_REQUEST]
            for i in range(0, len(regions), MAX_RANGES_PER_REQUEST)
        ]
        out: dict[Region, bytes] = {}
        for found in await _gather([self._fetch_multi(loc, b) for b in batches]):
            out.update(found)
        return out

    async def _fetch_multi(self, loc: BlobLocation, batch: list[Region]) -> dict[Region, bytes]:
        if len(batch) == 1:
            return await self._fetch_single(loc, batch)
        try:
            found, missing, ignored = await self._get(loc, batch)
        except _MultiRangeRefused as e:
            self._mark_single(loc, str(e))
            return await self._fetch_single(loc, batch)
        if ignored:
            self._mark_single(loc, "a multi-range request got the whole blob")
        if missing:
            self._mark_single(loc, f"a multi-range answer lacked {len(missing)} range(s)")
            found.update(await self._fetch_single(loc, missing))
        return found

    async def _fetch_single(self, loc: BlobLocation, regions: list[Region]) -> dict[Region, bytes]:
        groups = coalesce(regions, gap=self.options.chunk_size)
        results = await _gather([self._get(loc, [g]) for g in groups])
        out: dict[Region, bytes] = {}
        gi = 0
        for r in regions:  # both sorted: walk them together
            while groups[gi][1] < r[1]:
                gi += 1
            g = groups[gi]
            found, missing, _ = results[gi]
            if missing:
                raise RegistryProtocolError(
                    f"blob {self.ref.locator}@{self.digest}: the answer to bytes "
                    f"{g[0]}-{g[1] - 1} does not hold them",
                    url=redact_url(loc.url),
                )
            data = found[g]
            out[r] = data if r == g else data[r[0] - g[0] : r[1] - g[0]]
        return out

    async def _get(
        self, loc: BlobLocation, regions: list[Region]
    ) -> tuple[dict[Region, bytes], list[Region], bool]:
        """One GET for ``regions``: (bytes found, regions missing, ranges ignored?)."""
        multi = len(regions) > 1
        for s in (self.stats, self.client.stats):
            s.range_requests += 1
            s.multi_range_requests += multi
        wanted = sum(e - s for s, e in regions)
        what = f"blob {self.ref.locator}@{self.digest}"

        async def consume(ex: Exchange) -> tuple[dict[Region, bytes], list[Region], bool]:
            status = ex.status
            if status == 206:
                try:
                    parts = await self._parts_206(ex, regions, wanted)
                except RegistryProtocolError as e:
                    if multi:
                        raise _MultiRangeRefused(f"unparsable answer: {e}") from e
                    raise
                found, missing = extract(parts, regions)
                return found, missing, False
            if status == 200:
                body = await ex.read_prefix(regions[-1][1])
                found, missing = extract([Part(0, memoryview(body))], regions)
                return found, missing, multi
            if status in (401, 403) and (ex.redirected or loc.redirected):
                raise _StaleLocation(f"HTTP {status} from {urlsplit(ex.url).netloc}")
            if multi and 400 <= status < 500 and status not in (401, 403, 404, 416):
                raise _MultiRangeRefused(f"HTTP {status} to a multi-range request")
            raise await ex.error(f"{what} {range_header(regions)[:80]}", BlobNotFound)

        return await self.client.request(
            "GET",
            loc.url,
            consume=consume,
            host=None if loc.redirected else loc.host,
            via=loc.host,
            timeout=loc.host.timeout,
            scope=pull_scope(self.ref),
            headers={"Range": range_header(regions)},
            stats=(self.stats,),
        )

    @staticmethod
    async def _parts_206(ex: Exchange, regions: list[Region], wanted: int) -> list[Part]:
        """The parts of a 206 answer. A single range is read only up to the end of what was
        asked for, however long the server says it is (the connection is then closed)."""
        boundary = multipart_boundary(ex.resp.headers.get("Content-Type"))
        if boundary is not None:
            body = await ex.read(wanted + _MULTIPART_OVERHEAD_PER_PART * len(regions) + 65536)
            return parse_byteranges(body, boundary)
        value = ex.resp.headers.get("Content-Range")
        start, end, _ = parse_content_range(value)
        shown = (value or "").strip()
        lo, hi = regions[0][0], regions[-1][1]
        if start != lo or end < hi:
            raise RangeMismatch(
                f"asked for bytes {lo}-{hi - 1}, the server answered {shown}",
                status=206,
                url=redact_url(ex.url),
            )
        hook = _PIECE_HOOK.get() if len(regions) == 1 else None
        piece, on_piece = hook if hook is not None else (0, None)
        body = await ex.read_prefix(hi - start, on_piece=on_piece, piece=piece)
        if len(body) != hi - start:
            raise RegistryProtocolError(
                f"Content-Range {shown} promises bytes {lo}-{hi - 1}, "
                f"the body ends after {len(body)}",
                status=206,
                url=redact_url(ex.url),
            )
        return [Part(start, memoryview(body))]

    # --- connectivity ------------------------------------------------------------------

    async def check(self) -> None:
        """Prove the blob is still reachable (cheap ``Range: bytes=0-0`` GET).

        Skipped when the last check succeeded less than ``valid_interval`` seconds ago
        (never skipped with ``check_always``). On failure the blob is located again from
        the first host (a mirror that is back is used again); RegistryError (or
        NotFound) if no host serves it.
        """
        interval = self.options.check_interval
        if self._last_check_ok is not None and time.monotonic() - self._last_check_ok < interval:
            return
        self.stats.checks += 1
        self.client.stats.checks += 1
        loc = await self._location()
        try:
            await self._ping(loc)
        except _StaleLocation:
            await self._refresh(loc, next_host=False)
        except StargzError as e:
            log.info("blob %s@%s: check on %s failed (%s)", self.ref, self.digest, loc.host, e)
            async with self._lock:
                await self._locate_from(0)
        self._last_check_ok = time.monotonic()

    async def _ping(self, loc: BlobLocation) -> None:
        async def consume(ex: Exchange) -> None:
            if ex.status in (200, 206, 416):  # the server knows the blob
                return
            if ex.status in (401, 403) and (ex.redirected or loc.redirected):
                raise _StaleLocation(f"HTTP {ex.status}")
            raise await ex.error(f"check of blob {self.ref.locator}@{self.digest}", BlobNotFound)

        await self.client.request(
            "GET",
            loc.url,
            consume=consume,
            host=None if loc.redirected else loc.host,
            via=loc.host,
            timeout=loc.host.timeout,
            scope=pull_scope(self.ref),
            headers={"Range": "bytes=0-0"},
            stats=(self.stats,),
        )

    # --- from threads --------------------------------------------------------------------

    def sync_read_at(
        self, loop: asyncio.AbstractEventLoop, *, timeout: float | None = None
    ) -> Callable[[int, int], bytes]:
        """A blocking ``read_at(offset, size)`` that runs :meth:`read_at` on ``loop``.

        For code that runs in a worker thread (the eStargz reader). Calling it on the
        loop's own thread would deadlock, so that raises RuntimeError.
        """
        return _sync(loop, self.read_at, timeout)


def _sync(
    loop: asyncio.AbstractEventLoop,
    fn: Callable[[int, int], Awaitable[bytes]],
    timeout: float | None,
) -> Callable[[int, int], bytes]:
    def read_at(offset: int, size: int) -> bytes:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise RuntimeError(
                "sync_read_at called on its event loop's thread (it would deadlock); "
                "call it from a worker thread, e.g. asyncio.to_thread"
            )
        fut = asyncio.run_coroutine_threadsafe(fn(offset, size), loop)  # type: ignore[arg-type]
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError as e:
            fut.cancel()
            raise RegistryError(
                f"read of {size} bytes at {offset} not done after {timeout} s"
            ) from e

    return read_at
