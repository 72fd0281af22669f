"""One platform's image from a source reference: manifest, config and where its layers are.

``stargz optimize`` reads its input through :func:`source_image` (any form
`stargz.image.refs` parses: an OCI layout or a registry reference) and writes its output
through `stargz.image.convert.convert` (``layer_files`` = the prioritized files of each
layer, ``manifest`` = the descriptor chosen here). An index is resolved to one platform
(``--platform``, else this machine's). A layout's layer blobs are on this machine already;
a registry image's are not until `stargz.image.pull.pull_layers` brings them into a
scratch layout.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from stargz.errors import FailedPrecondition, InvalidArgument, ManifestNotFound
from stargz.image.endpoints import LayoutSource, Source, load_object
from stargz.image.layout import INDEX_TYPES, MANIFEST_TYPES, REF_NAME, Layout
from stargz.image.refs import LayoutLocation, RegistryLocation, parse_location
from stargz.remote.manifest import Platform, host_platform

_ATTESTATION = ("vnd.docker.reference.type", "attestation-manifest")


@dataclass
class SourceImage:
    """The manifest of one platform of an image, with its config and layer blobs."""

    #: The reference as the user wrote it (for messages).
    ref: str
    #: The manifest's descriptor (digest, size, mediaType) in the source.
    descriptor: dict[str, Any]
    manifest: dict[str, Any]
    config: dict[str, Any]
    #: Where the layer blobs are on this machine; None while they are in a registry.
    layout: Layout | None
    #: The manifest and config exactly as the source serves them (digests kept).
    raw_manifest: bytes = b""
    raw_config: bytes = b""
    #: What `convert` reads the image from: ``ref``, or the scratch layout it was pulled to.
    convert_ref: str = ""
    #: The tag a destination without one gets (the source's, else ``latest``).
    tag: str = "latest"

    @property
    def digest(self) -> str:
        return str(self.descriptor["digest"])

    @property
    def layers(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("layers") or [])

    def blob_path(self, digest: str) -> str:
        """A local file with the blob's bytes."""
        if self.layout is None:
            raise FailedPrecondition(f"{self.ref}: layer {digest} is not on this machine")
        path = self.layout.blob_path(digest)
        self.layout.open_blob(digest).close()  # NotFound when missing
        return path


def source_image(ref: str, platform: str | None = None, *, plain_http: bool = False) -> SourceImage:
    """Resolve ``ref`` to one manifest (``platform``, ``os/arch[/variant]``, default this
    machine's, when it is an index), and read its config. Nothing but manifests and the
    config is fetched."""
    return asyncio.run(source_image_async(ref, platform, plain_http=plain_http))


async def source_image_async(
    ref: str, platform: str | None = None, *, plain_http: bool = False
) -> SourceImage:
    """:func:`source_image` on a running event loop."""
    want = Platform.parse(platform) if platform else host_platform()
    loc = parse_location(ref)
    if isinstance(loc, LayoutLocation):
        source = LayoutSource(loc.path, loc.tag)
        image = await _resolve(source, ref, want)
        image.layout = source.layout
        image.tag = loc.tag or (image.descriptor.get("annotations") or {}).get(REF_NAME) or "latest"
        return image
    assert isinstance(loc, RegistryLocation)
    from stargz.image.registry import RegistrySource, make_client

    async with make_client([loc.ref], plain_http=plain_http) as client:
        image = await _resolve(RegistrySource(client, loc.ref), ref, want)
    image.tag = loc.ref.tag or "latest"
    return image


async def _resolve(source: Source, ref: str, want: Platform) -> SourceImage:
    desc, raw = await source.resolve()
    for _ in range(4):  # an index of indexes is allowed, a deep one is not sane
        mt = desc.get("mediaType")
        if mt in MANIFEST_TYPES:
            break
        if mt not in INDEX_TYPES:
            raise InvalidArgument(f"{ref}: {desc.get('digest')} has unsupported media type {mt!r}")
        index = load_object(raw, f"{ref}: index {desc['digest']}")
        desc = _pick(index.get("manifests") or [], want, ref)
        raw = await source.fetch(desc["digest"], manifest=True)
    else:
        raise InvalidArgument(f"{ref}: indexes nested too deep")
    manifest = load_object(raw, f"{ref}: manifest {desc['digest']}")
    cdesc = manifest.get("config")
    if not isinstance(manifest.get("layers"), list) or not isinstance(cdesc, dict):
        raise InvalidArgument(f"{ref}: manifest {desc['digest']} has no layers list or config")
    craw = await source.fetch(cdesc["digest"])
    config = load_object(craw, f"{ref}: config {cdesc['digest']}")
    return SourceImage(ref, desc, manifest, config, None, raw, craw, ref)


def _pick(manifests: list[Any], want: Platform, ref: str) -> dict[str, Any]:
    entries = [
        d
        for d in manifests
        if isinstance(d, dict)
        and (d.get("annotations") or {}).get(_ATTESTATION[0]) != _ATTESTATION[1]
    ]
    for d in entries:
        if want.matches(d.get("platform") or {}):
            return d
    have = ", ".join(_platform_str(d.get("platform")) for d in entries) or "none"
    raise ManifestNotFound(f"{ref}: no manifest for platform {want} (index has: {have})")


def _platform_str(p: Any) -> str:
    if not isinstance(p, dict):
        return "?"
    return f"{p.get('os')}/{p.get('architecture')}" + (
        f"/{p['variant']}" if p.get("variant") else ""
    )
