"""A whole blob from the registry into a file, streamed and verified.

For tools that need every byte of a layer (the converter), not random access: one GET
(redirects to storage followed, mirrors tried first), the body written in pieces of at
most 1 MiB as it arrives and hashed on the way, so memory does not grow with the blob. A
body cut short, or a piece that takes longer than the host's request timeout, is fetched
again from the start (the file is truncated first); a body that does not hash to the
digest is :class:`~stargz.errors.DigestMismatch`.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import BinaryIO

from stargz.errors import BlobNotFound, DigestMismatch, RegistryProtocolError
from stargz.remote.hosts import RegistryHost
from stargz.remote.reference import Reference, validate_digest
from stargz.remote.transport import Exchange, Transport, pull_scope

#: ``on_progress(bytes received so far)``; starts again at 0 when a request is retried.
ReceiveProgress = Callable[[int], None]
_PIECE = 1 << 20


async def download_blob(
    t: Transport,
    ref: Reference,
    digest: str,
    dst: BinaryIO,
    *,
    size: int | None = None,
    on_progress: ReceiveProgress | None = None,
) -> int:
    """Write blob ``digest`` of ``ref``'s repository to ``dst`` (from its current
    position, which must be 0); returns its size. ``size``: what the descriptor says."""
    validate_digest(digest)
    algo = digest.partition(":")[0]
    what = f"blob {ref.locator}@{digest}"

    async def on_host(_: int, host: RegistryHost) -> int:
        async def consume(ex: Exchange) -> int:
            if ex.status != 200:
                raise await ex.error(what, BlobNotFound)
            length = ex.resp.content_length
            if size is not None and length is not None and length != size:
                raise RegistryProtocolError(
                    f"{what}: {length} bytes, the descriptor says {size}", status=200
                )
            await asyncio.to_thread(_rewind, dst)
            h = hashlib.new(algo)
            got = 0
            if on_progress:
                on_progress(0)
            while True:
                # no deadline for the whole body (layers are big): one per piece instead
                async with asyncio.timeout(host.timeout):
                    piece = await ex.resp.content.read(_PIECE)
                if not piece:
                    break
                h.update(piece)
                await asyncio.to_thread(dst.write, piece)
                got += len(piece)
                ex._count(len(piece))
                if on_progress:
                    on_progress(got)
            if length is not None and got != length:
                # aiohttp raises for a short body; a server that lied about it lands here
                raise RegistryProtocolError(f"{what}: body ended after {got} of {length} bytes")
            if f"{algo}:{h.hexdigest()}" != digest:
                raise DigestMismatch(f"{what} hashes to {algo}:{h.hexdigest()}")
            return got

        return await t.request(
            "GET",
            host.url(f"{ref.repository}/blobs/{digest}"),
            consume=consume,
            host=host,
            scope=pull_scope(ref),
            timeout=None,
        )

    n = await t.over_hosts(ref, what, on_host)
    await asyncio.to_thread(dst.flush)
    return n


def _rewind(f: BinaryIO) -> None:
    f.seek(0)
    f.truncate()
