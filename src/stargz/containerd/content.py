"""Putting a fetched blob into containerd's content store the way containerd's own fetch
handlers leave it: written through the ingest ``<kind>-<digest>`` (containerd verifies size
and digest on commit), then labelled with the children the garbage collector must keep
(``containerd.io/gc.ref.content.*``) and the repository it came from
(``containerd.io/distribution.source.<host>``).

Labels are set with ``Content.Update`` after the write, whether the blob was new or already
there, as ``images.SetChildrenMappedLabels`` and ``AppendDistributionSourceLabel`` do.
"""

from __future__ import annotations

from collections.abc import Mapping

from stargz.containerd import labels as L
from stargz.containerd.client import ContainerdClient
from stargz.remote.manifest import Descriptor
from stargz.remote.reference import Reference


async def store_blob(
    cd: ContainerdClient,
    ref: Reference,
    desc: Descriptor,
    source: bytes,
    child_labels: Mapping[str, str] | None = None,
) -> bool:
    """Write ``source`` as ``desc`` unless containerd has it, then label it. Returns
    whether it was written."""
    written = await cd.write_content(L.ingest_ref(desc), desc, source)
    await label_blob(cd, ref, desc.digest, child_labels or {})
    return written


async def label_blob(
    cd: ContainerdClient, ref: Reference, digest: str, extra: Mapping[str, str] | None = None
) -> None:
    """Add ``ref``'s repository to the blob's distribution source label, and ``extra``."""
    info = await cd.content_info(digest)
    key = L.distribution_source(ref, None)[0]
    key, value = L.distribution_source(ref, info.labels.get(key) if info else None)
    new = dict(extra or {})
    if L.fits(key, value):
        new[key] = value
    await cd.update_content_labels(digest, new)
