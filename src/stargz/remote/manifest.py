"""Manifests and indexes (OCI image-spec and Docker schema 2), and platform selection.

Pure data: parsing and choosing, no I/O. A manifest's identity is the sha256 of its exact
bytes, which the client checks against the digest it asked for.
"""

from __future__ import annotations

import json
import platform as _platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stargz.errors import InvalidArgument, ManifestNotFound

MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

MANIFEST_TYPES = (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST)
INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)
#: Sent as ``Accept`` for manifest requests, most wanted first.
ACCEPT = ", ".join((MT_OCI_MANIFEST, MT_OCI_INDEX, MT_DOCKER_MANIFEST, MT_DOCKER_LIST, "*/*;q=0.1"))

TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"

_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        out = f"{self.os}/{self.architecture}"
        return out + (f"/{self.variant}" if self.variant else "")

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``linux/amd64`` or ``linux/arm/v7``."""
        parts = text.split("/")
        if not 2 <= len(parts) <= 3 or not all(parts):
            raise InvalidArgument(f"platform {text!r}: want os/arch[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, other: Mapping[str, Any]) -> bool:
        """Whether an index entry's ``platform`` object is this platform."""
        if other.get("os") != self.os or other.get("architecture") != self.architecture:
            return False
        theirs = other.get("variant") or None
        if self.variant is None:
            return True
        if self.architecture == "arm64" and {theirs, self.variant} <= {None, "v8"}:
            return True
        return theirs == self.variant


def host_platform() -> Platform:
    """This machine's platform as OCI spells it (``linux/amd64`` here)."""
    machine = _platform.machine().lower()
    arch = _ARCH.get(machine, machine)
    variant = None
    if arch == "arm":
        variant = "v7" if machine.startswith("armv7") else "v6"
    os_name = "linux" if sys.platform.startswith("linux") else sys.platform
    return Platform(os_name, arch, variant)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    urls: tuple[str, ...] = ()
    platform: Mapping[str, Any] | None = None

    @property
    def toc_digest(self) -> str | None:
        """The eStargz TOC digest annotation (the layer's trust root), if any."""
        return self.annotations.get(TOC_DIGEST_ANNOTATION)

    @classmethod
    def from_json(cls, obj: Any, where: str = "descriptor") -> Descriptor:
        if not isinstance(obj, dict):
            raise InvalidArgument(f"{where}: not an object")
        try:
            digest, size = obj["digest"], obj["size"]
        except KeyError as e:
            raise InvalidArgument(f"{where}: missing {e.args[0]!r}") from None
        if not isinstance(digest, str) or type(size) is not int or size < 0:
            raise InvalidArgument(f"{where}: bad digest or size")
        ann = obj.get("annotations") or {}
        return cls(
            media_type=str(obj.get("mediaType", "")),
            digest=digest,
            size=size,
            annotations={str(k): str(v) for k, v in ann.items()},
            urls=tuple(obj.get("urls") or ()),
            platform=obj.get("platform"),
        )


@dataclass(frozen=True)
class Manifest:
    """An image manifest, as fetched: raw bytes, digest, config and layer descriptors."""

    digest: str
    media_type: str
    raw: bytes
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)
    #: The digest of the index this manifest was chosen from, if any.
    index_digest: str | None = None

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.raw)


def load_json(raw: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise InvalidArgument(f"{what}: not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{what}: not a JSON object")
    return obj


def media_type_of(obj: Mapping[str, Any], content_type: str | None) -> str:
    """The manifest's media type: its ``mediaType`` field, the header, or its shape."""
    mt = obj.get("mediaType")
    if isinstance(mt, str) and mt:
        return mt
    ct = (content_type or "").split(";", 1)[0].strip().lower()
    if ct in MANIFEST_TYPES + INDEX_TYPES:
        return ct
    if "manifests" in obj:
        return MT_OCI_INDEX
    if "layers" in obj:
        return MT_OCI_MANIFEST
    return ct


def parse_manifest(raw: bytes, digest: str, media_type: str, what: str) -> Manifest:
    obj = load_json(raw, what)
    if obj.get("schemaVersion") != 2:
        raise InvalidArgument(f"{what}: schemaVersion {obj.get('schemaVersion')!r} unsupported")
    layers = obj.get("layers")
    if not isinstance(layers, list):
        raise InvalidArgument(f"{what}: no layers")
    return Manifest(
        digest=digest,
        media_type=media_type,
        raw=raw,
        config=Descriptor.from_json(obj.get("config"), f"{what}: config"),
        layers=tuple(Descriptor.from_json(x, f"{what}: layer {i}") for i, x in enumerate(layers)),
        annotations=dict(obj.get("annotations") or {}),
    )


def select_platform(index: Mapping[str, Any], want: Platform, what: str) -> Descriptor:
    """The first index entry for ``want`` (entries without a platform never match)."""
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise InvalidArgument(f"{what}: index without manifests")
    seen: list[str] = []
    for i, e in enumerate(entries):
        d = Descriptor.from_json(e, f"{what}: entry {i}")
        p = d.platform or {}
        if isinstance(p, dict) and want.matches(p):
            return d
        if isinstance(p, dict) and p:
            seen.append(
                f"{p.get('os')}/{p.get('architecture')}"
                + (f"/{p['variant']}" if p.get("variant") else "")
            )
    raise ManifestNotFound(
        f"{what}: no manifest for platform {want} (index has: {', '.join(seen) or 'none'})"
    )
