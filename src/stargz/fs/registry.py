"""The registry-backed `LayerSource`: layers fetched with `stargz.remote` (aiohttp).

`RegistryLayerSource.resolve` opens the blob on the first host that serves it (mirrors
first, then the registry, as configured in ``[resolver]``) and returns the remote
`BlobReader`, which already is a `stargz.fs.source.Blob`: ``size``, ``read_ranges`` (one
multi-range request, single-range fallback, retries, redirects to storage) and
``check`` (a ``Range: bytes=0-0`` probe, at most every ``[blob] valid_interval``).

Resolved blobs are kept for ``resolve_result_entry_ttl_sec`` (Go: resolve result TTL
cache), so the mount of a layer that was resolved a moment ago (another snapshot of the
same image) does not probe the registry again; a `check` failure in the filesystem
resolves with ``fresh=True`` semantics by evicting the entry first.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from stargz.config import Config
from stargz.fs.source import Blob


class RegistryLayerSource:
    """Resolves ``(image ref, layer digest)`` through a `stargz.remote.RegistryClient`."""

    def __init__(self, client: Any = None, *, ttl: float = 120.0) -> None:
        if client is None:
            from stargz.remote import RegistryClient

            client = RegistryClient()
        self.client = client
        self.ttl = ttl
        self._cache: dict[tuple[str, str], tuple[float, Blob]] = {}

    @classmethod
    def from_config(cls, cfg: Config) -> RegistryLayerSource:
        """Client options from the daemon config's ``[resolver]`` and ``[blob]`` tables."""
        from stargz.remote import BlobOptions, RegistryClient, ResolverOptions

        client = RegistryClient(
            resolver=ResolverOptions.from_config(cfg.resolver),
            blob=BlobOptions.from_config(cfg.blob),
        )
        return cls(client, ttl=float(cfg.resolve_result_entry_ttl_sec))

    async def resolve(self, ref: str, digest: str, labels: Mapping[str, str]) -> Blob:
        key = (ref, digest)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        blob = await self.client.open_blob(ref, digest)
        self._cache[key] = (now + self.ttl, blob)
        return blob

    def forget(self, ref: str, digest: str) -> None:
        """Drop a cached resolution (the filesystem does before re-resolving a dead blob)."""
        self._cache.pop((ref, digest), None)

    async def close(self) -> None:
        self._cache.clear()
        await self.client.close()
