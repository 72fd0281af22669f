"""The write side of the registry API (OCI distribution spec, "push"), over a
:class:`~stargz.remote.transport.Transport`: does a repository have a blob, mount a blob
from another repository of the same registry, upload a blob from a file, put a manifest.

Pushes go to the registry itself, never to a mirror (mirrors are read-only caches). Every
request asks for the ``repository:<name>:pull,push`` scope, so one bearer token covers a
whole image; a cross-repository mount adds ``repository:<from>:pull``.

Uploads are monolithic: ``POST /v2/<name>/blobs/uploads/`` opens a session and one
``PUT <location>?digest=<d>`` sends the file. The body is read from the file in 1 MiB
pieces as it is sent, so memory does not grow with the blob; a retried request (a 5xx,
a dropped connection, a 401 answered with credentials) re-reads the file from its start.
There is no deadline for a whole upload, only one per 1 MiB piece (the host's request
timeout).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

from aiohttp import payload
from aiohttp.abc import AbstractStreamWriter

from stargz.errors import RegistryProtocolError
from stargz.remote.hosts import RegistryHost
from stargz.remote.reference import Reference, validate_digest
from stargz.remote.transport import Exchange, Transport

#: ``on_progress(bytes sent so far)``; starts again at 0 when a request is retried.
SendProgress = Callable[[int], None]
_PIECE = 1 << 20


def push_scope(ref: Reference) -> str:
    return f"repository:{ref.repository}:pull,push"


def origin(t: Transport, ref: Reference) -> RegistryHost:
    """The registry itself (first non-mirror host: with plain http configured for it, that
    one), where pushes go."""
    return next(h for h in t.hosts(ref) if not h.is_mirror)


class FilePayload(payload.Payload):
    """A request body read from ``path`` as it is sent; re-readable for retries."""

    _autoclose = True

    def __init__(
        self, path: str, on_progress: SendProgress | None = None, timeout: float | None = None
    ) -> None:
        super().__init__(path, content_type="application/octet-stream")
        self._path = path
        self._timeout = timeout
        self._size = os.path.getsize(path)
        self._on_progress = on_progress

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a blob upload body is not text")

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        left = self._size if content_length is None else min(content_length, self._size)
        sent = 0
        if self._on_progress:
            self._on_progress(0)
        f = await asyncio.to_thread(open, self._path, "rb")
        try:
            while left > 0:
                piece = await asyncio.to_thread(f.read, min(_PIECE, left))
                if not piece:
                    break
                async with asyncio.timeout(self._timeout):
                    await writer.write(piece)
                left -= len(piece)
                sent += len(piece)
                if self._on_progress:
                    self._on_progress(sent)
        finally:
            f.close()


async def blob_exists(t: Transport, ref: Reference, digest: str) -> bool:
    """Whether the repository has the blob (``HEAD``; 404 is False, other errors raise)."""
    validate_digest(digest)
    host = origin(t, ref)

    async def consume(ex: Exchange) -> bool:
        if ex.status == 200:
            return True
        if ex.status == 404:
            return False
        raise await ex.error(f"HEAD blob {ref.locator}@{digest}")

    return await t.request(
        "HEAD",
        host.url(f"{ref.repository}/blobs/{digest}"),
        consume=consume,
        host=host,
        scope=push_scope(ref),
    )


async def start_upload(
    t: Transport, ref: Reference, *, mount: str | None = None, from_repo: str | None = None
) -> str | None:
    """Open an upload session; its URL, or None when ``mount`` (a digest) was mounted
    from ``from_repo`` of the same registry (``201 Created``) instead."""
    host = origin(t, ref)
    url = host.url(f"{ref.repository}/blobs/uploads/")
    scope = push_scope(ref)
    if mount is not None:
        validate_digest(mount)
        url += ("&" if "?" in url else "?") + urlencode({"mount": mount, "from": from_repo})
        scope += f" repository:{from_repo}:pull"

    async def consume(ex: Exchange) -> str | None:
        if ex.status == 201 and mount is not None:
            return None
        if ex.status != 202:
            raise await ex.error(f"start upload to {ref.locator}")
        location = ex.resp.headers.get("Location")
        if not location:
            raise RegistryProtocolError(
                f"start upload to {ref.locator}: 202 without a Location header", status=202
            )
        return urljoin(ex.url, location)

    return await t.request(
        "POST", url, consume=consume, host=host, scope=scope, headers={"Content-Length": "0"}
    )


async def finish_upload(
    t: Transport,
    ref: Reference,
    location: str,
    digest: str,
    body: Any,
) -> None:
    """``PUT <location>&digest=<digest>`` with the whole blob as ``body``."""
    host: RegistryHost | None = origin(t, ref)
    url = location + ("&" if "?" in location else "?") + urlencode({"digest": digest})
    if urlsplit(url).netloc != host.netloc:
        host = None  # an upload URL elsewhere gets none of the registry's credentials

    async def consume(ex: Exchange) -> None:
        if ex.status not in (201, 204):
            raise await ex.error(f"upload of {digest} to {ref.locator}")

    await t.request(
        "PUT",
        url,
        consume=consume,
        host=host,
        scope=push_scope(ref),
        headers={"Content-Type": "application/octet-stream"},
        data=body,
        timeout=None,
    )


async def upload_file(
    t: Transport,
    ref: Reference,
    digest: str,
    path: str,
    *,
    location: str | None = None,
    on_progress: SendProgress | None = None,
) -> None:
    """Upload the blob in ``path`` (its digest is ``digest``; the registry checks it).
    ``location``: an upload session already open (from a mount that was refused)."""
    if location is None:
        location = await start_upload(t, ref)
        assert location is not None
    body = FilePayload(path, on_progress, origin(t, ref).timeout)
    await finish_upload(t, ref, location, digest, body)


async def upload_bytes(t: Transport, ref: Reference, digest: str, data: bytes) -> None:
    """Upload a small blob (an image config) held in memory."""
    location = await start_upload(t, ref)
    assert location is not None
    await finish_upload(t, ref, location, digest, data)


async def put_manifest(
    t: Transport, ref: Reference, obj: str, raw: bytes, media_type: str
) -> str | None:
    """``PUT /v2/<name>/manifests/<obj>`` (a digest or a tag); returns the digest the
    registry says it stored (``Docker-Content-Digest``), if it says."""
    host = origin(t, ref)

    async def consume(ex: Exchange) -> str | None:
        if ex.status not in (200, 201, 204):
            raise await ex.error(f"put manifest {ref.locator}:{obj}")
        return ex.resp.headers.get("Docker-Content-Digest")

    return await t.request(
        "PUT",
        host.url(f"{ref.repository}/manifests/{obj}"),
        consume=consume,
        host=host,
        scope=push_scope(ref),
        headers={"Content-Type": media_type},
        data=raw,
    )
