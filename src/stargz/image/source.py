"""One platform's image from a source reference: manifest, config and local layer blobs.

``stargz optimize`` reads its input through :func:`source_image` and writes its output
through `stargz.image.convert.convert` (``layer_files`` = the prioritized files of each
layer, ``manifest`` = the descriptor chosen here), so any source `convert` learns to read
is one `optimize` reads too. Today that is an OCI image layout (``oci:DIR:TAG``).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

from stargz.errors import InvalidArgument, NotFound
from stargz.image.layout import INDEX_TYPES, MANIFEST_TYPES, Layout, parse_ref

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}


def host_platform() -> tuple[str, str]:
    """(os, architecture) in OCI terms, of this machine."""
    m = platform.machine()
    return "linux", _ARCH.get(m, m)


@dataclass
class SourceImage:
    """The manifest of one platform of an image, with its config and layer blobs."""

    ref: str
    #: The manifest's descriptor (digest, size, mediaType) in the source.
    descriptor: dict[str, Any]
    manifest: dict[str, Any]
    config: dict[str, Any]
    layout: Layout

    @property
    def digest(self) -> str:
        return str(self.descriptor["digest"])

    @property
    def layers(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("layers") or [])

    def blob_path(self, digest: str) -> str:
        """A local file with the blob's bytes."""
        path = self.layout.blob_path(digest)
        self.layout.open_blob(digest).close()  # NotFound when missing
        return path


def source_image(ref: str, os_arch: tuple[str, str] | None = None) -> SourceImage:
    """Resolve ``ref`` to one manifest (this machine's platform when it is an index)."""
    lref = parse_ref(ref)
    layout = Layout(lref.path)
    desc = layout.resolve(lref.tag)
    want = os_arch or host_platform()
    for _ in range(4):  # an index of indexes is allowed, a deep one is not sane
        mt = desc.get("mediaType")
        if mt in MANIFEST_TYPES:
            break
        if mt not in INDEX_TYPES:
            raise InvalidArgument(f"{ref}: unsupported media type {mt!r}")
        index = layout.read_json(desc["digest"])
        desc = _pick(index.get("manifests") or [], want, ref)
    else:
        raise InvalidArgument(f"{ref}: indexes nested too deep")
    manifest = layout.read_json(desc["digest"])
    if not isinstance(manifest.get("layers"), list) or not isinstance(manifest.get("config"), dict):
        raise InvalidArgument(f"manifest {desc['digest']} has no layers list or config")
    config = layout.read_json(manifest["config"]["digest"])
    return SourceImage(ref, desc, manifest, config, layout)


def _pick(manifests: list[dict[str, Any]], want: tuple[str, str], ref: str) -> dict[str, Any]:
    for d in manifests:
        p = d.get("platform") or {}
        if (p.get("os"), p.get("architecture")) == want:
            return d
    raise NotFound(f"{ref} has no manifest for {want[0]}/{want[1]}")
