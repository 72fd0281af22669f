"""Image-level reads over a :class:`~stargz.remote.transport.Transport`: manifests
(through an index, for a platform), descriptors, and small whole blobs such as an image
config, each verified against its digest. Parsing is manifest.py's job.
"""

from __future__ import annotations

import hashlib

from stargz.errors import BlobNotFound, DigestMismatch, InvalidArgument, ManifestNotFound
from stargz.remote.hosts import RegistryHost
from stargz.remote.manifest import (
    ACCEPT,
    INDEX_TYPES,
    Descriptor,
    Manifest,
    Platform,
    load_json,
    media_type_of,
    parse_manifest,
    select_platform,
)
from stargz.remote.reference import Reference, parse_reference, validate_digest
from stargz.remote.transport import Exchange, Transport, pull_scope

MAX_MANIFEST_SIZE = 4 << 20


def digest_of(data: bytes, like: str) -> str:
    """The digest of ``data`` with the algorithm of ``like`` (sha256 when empty)."""
    algo = like.partition(":")[0] if like else "sha256"
    try:
        h = hashlib.new(algo)
    except ValueError:
        raise InvalidArgument(f"unsupported digest algorithm {algo!r}") from None
    h.update(data)
    return f"{algo}:{h.hexdigest()}"


async def manifest_bytes(
    t: Transport, ref: Reference, obj: str, expect: str | None
) -> tuple[bytes, str, str]:
    async def on_host(_: int, host: RegistryHost) -> tuple[bytes, str, str]:
        url = host.url(f"{ref.repository}/manifests/{obj}")

        async def consume(ex: Exchange) -> tuple[bytes, str, str]:
            if ex.status != 200:
                raise await ex.error(f"manifest {ref.locator}:{obj}", ManifestNotFound)
            raw = await ex.read(MAX_MANIFEST_SIZE)
            digest = digest_of(raw, expect or "sha256:")
            if expect is not None and digest != expect:
                raise DigestMismatch(
                    f"manifest {ref.locator}@{expect} from {host.netloc} hashes to {digest}"
                )
            return raw, ex.resp.headers.get("Content-Type", ""), digest

        return await t.request(
            "GET",
            url,
            consume=consume,
            host=host,
            scope=pull_scope(ref),
            headers={"Accept": ACCEPT},
        )

    return await t.over_hosts(ref, f"manifest {ref}", on_host)


async def get_manifest(t: Transport, ref: Reference | str, platform: Platform) -> Manifest:
    """The image manifest for ``ref``; from an index, the entry for ``platform``
    . A digest reference is verified."""
    ref = parse_reference(ref)
    raw, ctype, digest = await manifest_bytes(t, ref, ref.object, ref.digest)
    obj = load_json(raw, f"manifest {ref}")
    mtype = media_type_of(obj, ctype)
    index_digest = None
    if mtype in INDEX_TYPES:
        entry = select_platform(obj, platform, f"index {ref}")
        validate_digest(entry.digest)
        index_digest = digest
        raw, ctype, digest = await manifest_bytes(t, ref, entry.digest, entry.digest)
        obj = load_json(raw, f"manifest {ref}@{entry.digest}")
        mtype = media_type_of(obj, ctype)
        if mtype in INDEX_TYPES:
            raise InvalidArgument(f"{ref}: index {index_digest} points to another index")
    m = parse_manifest(raw, digest, mtype, f"manifest {ref}")
    if index_digest is None:
        return m
    return Manifest(m.digest, m.media_type, m.raw, m.config, m.layers, m.annotations, index_digest)


async def resolve(t: Transport, ref: Reference | str) -> Descriptor:
    """The descriptor ``ref`` points to (a manifest or an index), as the registry serves it."""
    ref = parse_reference(ref)
    raw, ctype, digest = await manifest_bytes(t, ref, ref.object, ref.digest)
    return Descriptor(media_type_of(load_json(raw, str(ref)), ctype), digest, len(raw))


async def fetch_blob(
    t: Transport, ref: Reference | str, digest: str, *, max_size: int = 64 << 20
) -> bytes:
    """A whole (small) blob such as an image config, verified against ``digest``."""
    ref = parse_reference(ref)
    validate_digest(digest)

    async def on_host(_: int, host: RegistryHost) -> bytes:
        async def consume(ex: Exchange) -> bytes:
            if ex.status != 200:
                raise await ex.error(f"blob {ref.locator}@{digest}", BlobNotFound)
            data = await ex.read(max_size)
            got = digest_of(data, digest)
            if got != digest:
                raise DigestMismatch(f"blob {ref.locator}@{digest} hashes to {got}")
            return data

        return await t.request(
            "GET",
            host.url(f"{ref.repository}/blobs/{digest}"),
            consume=consume,
            host=host,
            scope=pull_scope(ref),
        )

    return await t.over_hosts(ref, f"blob {digest}", on_host)
