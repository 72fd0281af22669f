"""Registry client: image references, manifests, and lazy random access to layer blobs.

The asyncio (aiohttp) side of the project, usable on uvloop. It uses
:mod:`stargz.estargz` (to open layers), never the other way round, and knows nothing of
FUSE or gRPC.

    cfg = stargz.config.load(path)
    async with RegistryClient(resolver=ResolverOptions.from_config(cfg.resolver),
                              blob=BlobOptions.from_config(cfg.blob)) as client:
        manifest = await client.get_manifest("127.0.0.1:5000/app:esgz")
        layer = manifest.layers[0]
        blob = await client.open_layer("127.0.0.1:5000/app:esgz", layer)
        head, tail = await blob.read_ranges([(0, 512), (blob.size - 51, 51)])
        reader = await open_reader(blob, toc_digest=layer.toc_digest)

Its names are loaded on first use: importing a submodule (``stargz.remote.reference``)
does not load aiohttp, so a daemon that mounts no lazy layer never does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stargz.remote.auth import (
        ChainKeychain,
        Challenge,
        Credentials,
        DockerConfigKeychain,
        Keychain,
        StaticKeychain,
        docker_config_path,
        parse_www_authenticate,
    )
    from stargz.remote.blob import MAX_RANGES_PER_REQUEST, BlobReader
    from stargz.remote.client import RegistryClient
    from stargz.remote.hosts import RegistryHost, is_localhost, registry_hosts
    from stargz.remote.layer import open_reader
    from stargz.remote.locate import BlobLocation
    from stargz.remote.manifest import (
        TOC_DIGEST_ANNOTATION,
        Descriptor,
        Manifest,
        Platform,
        host_platform,
    )
    from stargz.remote.options import BlobOptions, HostOptions, MirrorOptions, ResolverOptions
    from stargz.remote.reference import Reference, api_host, parse_reference
    from stargz.remote.stats import FetchStats
    from stargz.remote.transport import retryable_status

#: Where each name lives (imported on first use, see `__getattr__`).
_EXPORTS = {
    "ChainKeychain": "stargz.remote.auth",
    "Challenge": "stargz.remote.auth",
    "Credentials": "stargz.remote.auth",
    "DockerConfigKeychain": "stargz.remote.auth",
    "Keychain": "stargz.remote.auth",
    "StaticKeychain": "stargz.remote.auth",
    "docker_config_path": "stargz.remote.auth",
    "parse_www_authenticate": "stargz.remote.auth",
    "MAX_RANGES_PER_REQUEST": "stargz.remote.blob",
    "BlobReader": "stargz.remote.blob",
    "RegistryClient": "stargz.remote.client",
    "RegistryHost": "stargz.remote.hosts",
    "is_localhost": "stargz.remote.hosts",
    "registry_hosts": "stargz.remote.hosts",
    "open_reader": "stargz.remote.layer",
    "BlobLocation": "stargz.remote.locate",
    "TOC_DIGEST_ANNOTATION": "stargz.remote.manifest",
    "Descriptor": "stargz.remote.manifest",
    "Manifest": "stargz.remote.manifest",
    "Platform": "stargz.remote.manifest",
    "host_platform": "stargz.remote.manifest",
    "BlobOptions": "stargz.remote.options",
    "HostOptions": "stargz.remote.options",
    "MirrorOptions": "stargz.remote.options",
    "ResolverOptions": "stargz.remote.options",
    "Reference": "stargz.remote.reference",
    "api_host": "stargz.remote.reference",
    "parse_reference": "stargz.remote.reference",
    "FetchStats": "stargz.remote.stats",
    "retryable_status": "stargz.remote.transport",
}


def __getattr__(name: str) -> Any:
    """Load the submodule that defines ``name`` on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "MAX_RANGES_PER_REQUEST",
    "TOC_DIGEST_ANNOTATION",
    "BlobLocation",
    "BlobOptions",
    "BlobReader",
    "ChainKeychain",
    "Challenge",
    "Credentials",
    "Descriptor",
    "DockerConfigKeychain",
    "FetchStats",
    "HostOptions",
    "Keychain",
    "Manifest",
    "MirrorOptions",
    "Platform",
    "Reference",
    "RegistryClient",
    "RegistryHost",
    "ResolverOptions",
    "StaticKeychain",
    "api_host",
    "docker_config_path",
    "host_platform",
    "is_localhost",
    "open_reader",
    "parse_reference",
    "parse_www_authenticate",
    "registry_hosts",
    "retryable_status",
]
