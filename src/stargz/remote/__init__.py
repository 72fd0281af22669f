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
"""

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
