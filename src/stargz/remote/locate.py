"""Where a blob's bytes are: which host serves it, whether it redirects to storage (and
where), and its size, from one probe GET (Go's ``Range: bytes=0-0`` redirect probe, or
``bytes=-N`` to bring the blob's end along).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stargz.errors import BlobNotFound, RegistryError, RegistryProtocolError
from stargz.remote.hosts import RegistryHost
from stargz.remote.multipart import parse_content_range
from stargz.remote.reference import Reference, parse_reference, validate_digest
from stargz.remote.stats import FetchStats
from stargz.remote.transport import Exchange, Transport, pull_scope

#: Bytes of a blob's end that :meth:`stargz.remote.blob.BlobReader.open`'s probe asks for
#: (``Range: bytes=-N``), so that an eStargz footer (and a small TOC) come with the probe
#: instead of in a request of their own. Sized so that the answer (body + ~1 KiB of
#: headers) fits in a fresh TCP connection's first flight (10 segments of 1448 bytes):
#: the probe then costs no more round trips than ``bytes=0-0``. Measured in
#: benchmarks/bench_layer_open.py.
TAIL_PROBE_SIZE = 12 << 10


@dataclass(frozen=True)
class BlobLocation:
    """Where a blob's bytes are: the host that serves it and the URL to GET."""

    host_index: int
    host: RegistryHost
    url: str
    redirected: bool
    size: int


async def blob_size(t: Transport, ref: Reference | str, digest: str) -> int:
    """The blob's size from a HEAD request (following redirects)."""
    ref = parse_reference(ref)
    validate_digest(digest)

    async def on_host(index: int, host: RegistryHost) -> int:
        async def consume(ex: Exchange) -> int:
            if ex.status == 200 and ex.resp.content_length is not None:
                return ex.resp.content_length
            if ex.status == 404:
                raise BlobNotFound(f"blob {ref.locator}@{digest}: HTTP 404")
            # some storage backends refuse HEAD (ghcr's did): use the range probe
            return (await locate_blob(t, ref, digest, host_index=index)).size

        return await t.request(
            "HEAD",
            host.url(f"{ref.repository}/blobs/{digest}"),
            consume=consume,
            host=host,
            scope=pull_scope(ref),
        )

    return await t.over_hosts(ref, f"blob {digest}", on_host)


async def locate_blob(
    t: Transport,
    ref: Reference,
    digest: str,
    *,
    host_index: int,
    size: int | None = None,
    stats: Sequence[FetchStats] = (),
) -> BlobLocation:
    """Probe one host for a blob with ``GET Range: bytes=0-0`` (Go's redirect probe):
    tells whether it redirects (and where), and the blob's size."""
    loc, _ = await probe_blob(t, ref, digest, host_index=host_index, size=size, stats=stats, tail=0)
    return loc


async def probe_blob(
    t: Transport,
    ref: Reference,
    digest: str,
    *,
    host_index: int,
    size: int | None = None,
    stats: Sequence[FetchStats] = (),
    tail: int = 0,
) -> tuple[BlobLocation, bytes | None]:
    """:func:`locate_blob` that also brings the blob's last ``tail`` bytes.

    With ``tail`` > 0 the probe is ``GET Range: bytes=-<tail>`` (a suffix range) and
    returns ``(location, the blob's last min(tail, size) bytes)``; the bytes are None
    when the server did not send them: it ignored the range (``200``: the body is
    read only when it is at most ``tail`` bytes, else the connection is dropped) or
    answered a range that is not the blob's end. An empty blob is answered ``416``
    (``bytes */0``) or, by Go's ``http.ServeContent``, ``206 bytes 0--1/0``.
    """
    host = t.hosts(ref)[host_index]
    url = host.url(f"{ref.repository}/blobs/{digest}")
    what = f"blob {ref.locator}@{digest}"

    async def consume(ex: Exchange) -> tuple[BlobLocation, bytes | None]:
        got: int | None
        data: bytes | None = None
        if ex.status == 206:
            value = ex.resp.headers.get("Content-Range")
            try:
                start, end, got = parse_content_range(value)
            except RegistryProtocolError:
                if not tail or _total_of_empty(value) != 0:
                    raise
                start, end, got = 0, 0, 0  # Go's answer to bytes=-N on an empty blob
            n = end - start
            if tail and end == got and n <= tail and ex.resp.content_length == n:
                data = await ex.read(n)  # the blob's last n bytes
            # else the body is not read (past a byte, the connection is dropped)
        elif ex.status == 200:
            got = ex.resp.content_length
            if tail and got is not None and got <= tail:
                data = await ex.read(got)  # the whole blob, and the connection is kept
            # else the body is not read: the connection is dropped
        elif ex.status == 416:  # an empty blob has no byte 0
            got = _total_of_416(ex.resp.headers.get("Content-Range"))
            if tail and got == 0:
                data = b""
        else:
            raise await ex.error(f"{what} on {host.netloc}", BlobNotFound)
        if got is None:
            got = size
        if got is None:
            raise RegistryError(f"{what}: the server gives no size")
        if size is not None and got != size:
            raise RegistryError(f"{what} on {host.netloc}: size {got}, the descriptor says {size}")
        return BlobLocation(host_index, host, ex.url, ex.redirected, got), data

    return await t.request(
        "GET",
        url,
        consume=consume,
        host=host,
        scope=pull_scope(ref),
        headers={"Range": f"bytes=-{tail}" if tail else "bytes=0-0"},
        stats=stats,
    )


def _total_of_empty(value: str | None) -> int | None:
    """The total of a ``bytes <a>-<b>/<total>`` that does not parse as a range."""
    if value and value.strip().startswith("bytes "):
        total = value.strip().rpartition("/")[2]
        if total.isdigit():
            return int(total)
    return None


def _total_of_416(value: str | None) -> int | None:
    if value and value.strip().startswith("bytes */"):
        tail = value.strip()[len("bytes */") :]
        if tail.isdigit():
            return int(tail)
    return None
