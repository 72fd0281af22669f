"""The registry client: OCI distribution / Docker registry v2 over aiohttp.

:class:`RegistryClient` is what the rest of the project uses: the request engine of
:mod:`stargz.remote.transport` (retries, timeouts, auth, redirects, one connection pool)
plus image-level reads (:mod:`stargz.remote.images`: manifests, indexes, configs) and
random access to blobs (:mod:`stargz.remote.blob`, which finds them with
:mod:`stargz.remote.locate`). The arrows run one way: ``client -> images, blob ->
locate -> transport`` (``images -> transport``); none of those knows this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import aiohttp

from stargz.errors import InvalidArgument
from stargz.remote import images
from stargz.remote.auth import Keychain
from stargz.remote.blob import BlobReader
from stargz.remote.locate import TAIL_PROBE_SIZE, BlobLocation, blob_size, locate_blob, probe_blob
from stargz.remote.manifest import Descriptor, Manifest, Platform, host_platform
from stargz.remote.options import BlobOptions, ResolverOptions
from stargz.remote.reference import Reference, parse_reference, validate_digest
from stargz.remote.stats import FetchStats
from stargz.remote.transport import DEFAULT_KEYCHAIN, Transport, pull_scope, retryable_status

__all__ = [
    "TAIL_PROBE_SIZE",
    "BlobLocation",
    "RegistryClient",
    "pull_scope",
    "retryable_status",
]


class RegistryClient(Transport):
    """Registry API client. Use as ``async with RegistryClient(...) as client:``."""

    def __init__(
        self,
        *,
        resolver: ResolverOptions | None = None,
        blob: BlobOptions | None = None,
        keychain: Keychain | None = DEFAULT_KEYCHAIN,
        platform: Platform | None = None,
        max_connections: int = 64,
        redirect_ttl: float = 300.0,
        trust_env: bool = False,
        session: aiohttp.ClientSession | None = None,
        tail_probe_size: int = TAIL_PROBE_SIZE,
    ) -> None:
        """``keychain`` defaults to the docker config file; pass None for anonymous only.

        ``redirect_ttl``: seconds a blob's redirect target (a pre-signed storage URL) is
        reused before the registry is asked again. ``trust_env``: honour
        ``HTTP(S)_PROXY``/``NO_PROXY`` (and aiohttp's netrc lookup). ``session``: an
        existing aiohttp session to use (not closed by :meth:`close`).
        ``tail_probe_size``: how many of a blob's last bytes :meth:`open_blob` fetches with
        its probe and keeps (:meth:`BlobReader.take_tail`); 0 probes ``bytes=0-0`` only.
        """
        if tail_probe_size < 0:
            raise InvalidArgument(f"tail_probe_size {tail_probe_size} is negative")
        super().__init__(
            resolver=resolver,
            blob=blob,
            keychain=keychain,
            max_connections=max_connections,
            trust_env=trust_env,
            session=session,
        )
        self.platform = platform or host_platform()
        self.redirect_ttl = redirect_ttl
        self.tail_probe_size = tail_probe_size

    # --- manifests ------------------------------------------------------------------------

    async def get_manifest(
        self, ref: Reference | str, *, platform: Platform | None = None
    ) -> Manifest:
        """The image manifest for ``ref``; from an index, the entry for ``platform``
        (default: this host's, e.g. linux/amd64). A digest reference is verified."""
        return await images.get_manifest(self, ref, platform or self.platform)

    async def resolve(self, ref: Reference | str) -> Descriptor:
        """The descriptor ``ref`` points to (a manifest or an index), as the registry serves it."""
        return await images.resolve(self, ref)

    # --- blobs ------------------------------------------------------------------------

    async def fetch_blob(
        self, ref: Reference | str, digest: str, *, max_size: int = 64 << 20
    ) -> bytes:
        """A whole (small) blob such as an image config, verified against ``digest``."""
        return await images.fetch_blob(self, ref, digest, max_size=max_size)

    async def blob_size(self, ref: Reference | str, digest: str) -> int:
        """The blob's size from a HEAD request (following redirects)."""
        return await blob_size(self, ref, digest)

    async def locate_blob(
        self,
        ref: Reference,
        digest: str,
        *,
        host_index: int,
        size: int | None = None,
        stats: Sequence[FetchStats] = (),
    ) -> BlobLocation:
        """See :func:`stargz.remote.locate.locate_blob`."""
        return await locate_blob(self, ref, digest, host_index=host_index, size=size, stats=stats)

    async def probe_blob(
        self,
        ref: Reference,
        digest: str,
        *,
        host_index: int,
        size: int | None = None,
        stats: Sequence[FetchStats] = (),
        tail: int = 0,
    ) -> tuple[BlobLocation, bytes | None]:
        """See :func:`stargz.remote.locate.probe_blob`."""
        return await probe_blob(
            self, ref, digest, host_index=host_index, size=size, stats=stats, tail=tail
        )

    async def open_blob(
        self, ref: Reference | str, digest: str, *, size: int | None = None
    ) -> BlobReader:
        """A random-access reader of one blob, on the first host that serves it."""
        ref = parse_reference(ref)
        validate_digest(digest)
        reader = BlobReader(
            self,
            ref,
            digest,
            size,
            redirect_ttl=self.redirect_ttl,
            tail_probe_size=self.tail_probe_size,
        )
        await reader.open()
        return reader

    async def open_layer(self, ref: Reference | str, layer: Descriptor) -> BlobReader:
        """:meth:`open_blob` for a layer descriptor (its size is checked against the host)."""
        return await self.open_blob(ref, layer.digest, size=layer.size)
