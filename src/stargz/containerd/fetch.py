"""The registry side of a pull: what a reference names (index -> manifest for a platform ->
config), as the exact bytes containerd's content store is to hold, and whole layer blobs
for the layers that are unpacked rather than mounted lazily.

Built on :mod:`stargz.remote` (resolver, auth, retries, mirrors); every blob is checked
against its digest before containerd sees it (and containerd checks again on commit).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from stargz.errors import BlobNotFound, DigestMismatch, InvalidArgument, RegistryProtocolError
from stargz.remote import images
from stargz.remote.client import RegistryClient
from stargz.remote.hosts import RegistryHost
from stargz.remote.manifest import (
    INDEX_TYPES,
    Descriptor,
    Manifest,
    Platform,
    load_json,
    media_type_of,
    parse_manifest,
    select_platform,
)
from stargz.remote.reference import Reference, validate_digest
from stargz.remote.transport import Exchange, pull_scope

#: Largest image config accepted.
MAX_CONFIG_SIZE = 16 << 20
#: Bytes read from a layer download per step.
READ_SIZE = 1 << 20
#: A layer download slower than this on average (bytes/s) fails its attempt.
MIN_RATE = 64 << 10


class PlainHTTPClient(RegistryClient):
    """A registry client that speaks plain http to every host (``--plain-http``)."""

    def hosts(self, ref: Reference | str) -> list[RegistryHost]:
        return [dataclasses.replace(h, scheme="http") for h in super().hosts(ref)]


@dataclass(frozen=True)
class Blob:
    """A small blob as fetched: its descriptor and its exact bytes."""

    desc: Descriptor
    raw: bytes


@dataclass(frozen=True)
class Image:
    """Everything of an image but its layer blobs."""

    ref: Reference
    #: What the reference points to: the index, or the manifest when there is none.
    target: Descriptor
    #: The index (None when the reference names a manifest) and all its entries.
    index: Blob | None
    index_children: tuple[Descriptor, ...]
    manifest: Blob
    layers: tuple[Descriptor, ...]
    config: Blob
    #: ``rootfs.diff_ids`` of the config, one per layer.
    diff_ids: tuple[str, ...]


async def fetch_image(
    client: RegistryClient,
    ref: Reference,
    platform: Platform,
    on_manifest: Callable[[str, tuple[Descriptor, ...]], None] | None = None,
) -> Image:
    """Resolve ``ref`` and fetch its index (if any), the manifest for ``platform`` and the
    config; every byte verified against its digest. ``on_manifest(manifest digest,
    layers)`` is called before the config is asked for."""
    raw, ctype, digest = await images.manifest_bytes(client, ref, ref.object, ref.digest)
    obj = load_json(raw, f"manifest {ref}")
    mtype = media_type_of(obj, ctype)
    target = Descriptor(mtype, digest, len(raw))
    index: Blob | None = None
    children: tuple[Descriptor, ...] = ()
    if mtype in INDEX_TYPES:
        index = Blob(target, raw)
        entries = obj.get("manifests")
        if not isinstance(entries, list):
            raise InvalidArgument(f"index {ref}: no manifests")
        children = tuple(
            Descriptor.from_json(e, f"index {ref}: entry {i}") for i, e in enumerate(entries)
        )
        entry = select_platform(obj, platform, f"index {ref}")
        validate_digest(entry.digest)
        raw, ctype, digest = await images.manifest_bytes(client, ref, entry.digest, entry.digest)
        obj = load_json(raw, f"manifest {ref}@{entry.digest}")
        mtype = media_type_of(obj, ctype)
        if mtype in INDEX_TYPES:
            raise InvalidArgument(f"{ref}: index {index.desc.digest} points to another index")
        mdesc = Descriptor(entry.media_type or mtype, digest, len(raw))
    else:
        mdesc = target
    manifest = parse_manifest(raw, digest, mtype, f"manifest {ref}")
    if on_manifest is not None:
        on_manifest(mdesc.digest, tuple(manifest.layers))
    config_raw = await client.fetch_blob(ref, manifest.config.digest, max_size=MAX_CONFIG_SIZE)
    diff_ids = _diff_ids(config_raw, manifest, ref)
    return Image(
        ref=ref,
        target=target,
        index=index,
        index_children=children,
        manifest=Blob(mdesc, raw),
        layers=manifest.layers,
        config=Blob(manifest.config, config_raw),
        diff_ids=diff_ids,
    )


def _diff_ids(config_raw: bytes, manifest: Manifest, ref: Reference) -> tuple[str, ...]:
    cfg: Any = load_json(config_raw, f"image config {manifest.config.digest}")
    rootfs = cfg.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list) or not all(isinstance(d, str) for d in ids):
        raise InvalidArgument(f"{ref}: image config has no rootfs.diff_ids")
    if len(ids) != len(manifest.layers):
        raise InvalidArgument(
            f"{ref}: {len(manifest.layers)} layers but {len(ids)} diff IDs in the config"
        )
    for d in ids:
        validate_digest(d)
    return tuple(ids)


class Sink(Protocol):
    """Where a downloaded blob goes (a :class:`~stargz.containerd.client.ContentWriter`)."""

    def restart(self) -> None: ...

    async def write(self, data: bytes) -> None: ...


async def download_blob(
    client: RegistryClient, ref: Reference, desc: Descriptor, sink: Sink
) -> None:
    """Stream blob ``desc`` into ``sink`` (restarted on every retry), checking its size and
    digest. An attempt fails (and is retried) when no byte comes for a host's request
    timeout, or when it is slower than :data:`MIN_RATE` on average."""
    validate_digest(desc.digest)
    algo = desc.digest.partition(":")[0]

    async def on_host(_: int, host: RegistryHost) -> None:
        stall = host.timeout or client.resolver_options.default_timeout()

        async def consume(ex: Exchange) -> None:
            if ex.status != 200:
                raise await ex.error(f"blob {ref.locator}@{desc.digest}", BlobNotFound)
            sink.restart()
            h = hashlib.new(algo)
            n = 0
            while True:
                try:
                    async with asyncio.timeout(stall):
                        piece = await ex.resp.content.read(READ_SIZE)
                except TimeoutError:
                    raise aiohttp.ClientPayloadError(f"no data for {stall:g} s") from None
                if not piece:
                    break
                n += len(piece)
                if n > desc.size:
                    raise RegistryProtocolError(
                        f"blob {ref.locator}@{desc.digest}: more than {desc.size} bytes"
                    )
                h.update(piece)
                await sink.write(piece)
            if n != desc.size:
                raise aiohttp.ClientPayloadError(f"body ended after {n} of {desc.size} bytes")
            got = f"{algo}:{h.hexdigest()}"
            if got != desc.digest:
                raise DigestMismatch(f"blob {ref.locator}@{desc.digest} hashes to {got}")

        await client.request(
            "GET",
            host.url(f"{ref.repository}/blobs/{desc.digest}"),
            consume=consume,
            host=host,
            scope=pull_scope(ref),
            timeout=stall + desc.size / MIN_RATE,
        )

    await client.over_hosts(ref, f"blob {desc.digest}", on_host)
