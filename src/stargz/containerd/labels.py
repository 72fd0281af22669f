"""The labels a pull leaves in containerd, spelled as containerd and the Go tools spell them.

- **Snapshot labels** (what the remote snapshotter reads, SPEC §7.4): ``ctr-remote i
  rpull``'s stargz set (``AppendDefaultLabelsHandlerWrapper``: reference, layer digest,
  the following layers, their URLs, a 10 MiB prefetch size) plus containerd's CRI set
  (``pkg/snapshotters.AppendInfoHandlerWrapper``: image ref, manifest digest, layer digest,
  the following layers), so any remote snapshotter that reads either finds its labels.
  containerd passes a layer descriptor's annotations prefixed ``containerd.io/snapshot/``
  to ``Prepare`` (``snapshots.FilterInheritedLabels``), and adds
  ``containerd.io/snapshot.ref`` = the chain ID the snapshot is to become.
- **Garbage-collection labels** on content (``images.ChildGCLabels``): an index names each
  manifest (``containerd.io/gc.ref.content.m.<i>``), a manifest its config
  (``...content.config``) and layers (``...content.l.<i>``); the config names the top
  snapshot (``containerd.io/gc.ref.snapshot.<snapshotter>``); an unpacked layer blob
  records its diff ID (``containerd.io/uncompressed``).
- ``containerd.io/distribution.source.<host>`` = the repositories a blob came from.

A key and value together may not exceed 4096 bytes (containerd's ``labels.Validate``):
layer lists are cut at the last digest that fits.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

from stargz.remote.manifest import Descriptor
from stargz.remote.reference import Reference

MAX_LABEL_SIZE = 4096

SNAPSHOT_REF = "containerd.io/snapshot.ref"
INHERITED_PREFIX = "containerd.io/snapshot/"
GC_EXPIRE = "containerd.io/gc.expire"
GC_REF_SNAPSHOT = "containerd.io/gc.ref.snapshot."
UNCOMPRESSED = "containerd.io/uncompressed"
DISTRIBUTION_SOURCE = "containerd.io/distribution.source."

STARGZ_REFERENCE = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
STARGZ_LAYERS = "containerd.io/snapshot/remote/stargz.layers"
STARGZ_PREFETCH = "containerd.io/snapshot/remote/stargz.prefetch"
URLS = "containerd.io/snapshot/remote/urls"
URLS_PREFIX = "containerd.io/snapshot/remote/urls."
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"

#: What ``ctr-remote i rpull`` always sets as ``stargz.prefetch`` (a landmark wins).
DEFAULT_PREFETCH_SIZE = 10 << 20

MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
_KNOWN_CONFIGS = (
    MT_OCI_CONFIG,
    MT_DOCKER_CONFIG,
    "application/vnd.containerd.container.criu.checkpoint.criu.tar",
    "application/vnd.containerd.container.checkpoint.config.v1+proto",
)
_MANIFESTS = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
_INDEXES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
_DOCKER_LAYERS = (
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)


def fits(key: str, value: str) -> bool:
    return len(key) + len(value) <= MAX_LABEL_SIZE


def is_layer(media_type: str) -> bool:
    """containerd's ``images.IsLayerType``."""
    if media_type.startswith("application/vnd.oci.image.layer."):
        return True
    return media_type.split("+", 1)[0] in _DOCKER_LAYERS


def is_config(media_type: str) -> bool:
    return media_type in _KNOWN_CONFIGS


def ingest_ref(desc: Descriptor) -> str:
    """The content ingest name containerd's fetcher uses (``remotes.MakeRefKey``)."""
    mt = desc.media_type
    if mt in _MANIFESTS:
        return "manifest-" + desc.digest
    if mt in _INDEXES:
        return "index-" + desc.digest
    if is_layer(mt):
        return "layer-" + desc.digest
    if is_config(mt):
        return "config-" + desc.digest
    return "unknown-" + desc.digest


def child_gc_labels(children: Sequence[Descriptor]) -> dict[str, str]:
    """The labels a parent blob gets for its children (``images.SetChildrenMappedLabels``
    with ``ChildGCLabels``): keys ending in "." are numbered per key, in order."""
    out: dict[str, str] = {}
    seen: dict[str, int] = {}
    for ch in children:
        if is_config(ch.media_type):
            key = "containerd.io/gc.ref.content.config"
        elif ch.media_type in _MANIFESTS:
            key = "containerd.io/gc.ref.content.m."
        elif is_layer(ch.media_type):
            key = "containerd.io/gc.ref.content.l."
        else:
            key = "containerd.io/gc.ref.content."
        idx = seen.get(key, 0)
        seen[key] = idx + 1
        if idx > 0 or key.endswith("."):
            key = f"{key}{idx}"
        out[key] = ch.digest
    return out


def snapshot_gc_label(snapshotter: str) -> str:
    return GC_REF_SNAPSHOT + snapshotter


def lease_labels(expire_after: float = 24 * 3600) -> dict[str, str]:
    """A lease that the collector drops by itself if we never delete it (crash)."""
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + expire_after))
    return {GC_EXPIRE: when}


def distribution_source(ref: Reference, existing: str | None) -> tuple[str, str]:
    """``containerd.io/distribution.source.<host>`` and its value with ``ref``'s repository
    added (a sorted, de-duplicated comma list, as ``docker.AppendDistributionSourceLabel``;
    the host without its port, as Go's ``url.Hostname``)."""
    host = urlsplit("dummy://" + ref.locator).hostname or ref.host
    repos = {r for r in (existing or "").split(",") if r}
    repos.add(ref.repository)
    return DISTRIBUTION_SOURCE + host, ",".join(sorted(repos))


def _layer_list(key: str, layers: Sequence[Descriptor], sep_last: bool) -> list[Descriptor]:
    """The leading ``layers`` whose digests fit in label ``key``."""
    out: list[Descriptor] = []
    text = ""
    for d in layers:
        item = d.digest + "," if sep_last else ("," if text else "") + d.digest
        if not fits(key, text + item):
            break
        text += item
        out.append(d)
    return out


def _joined_fitting(key: str, values: Sequence[str]) -> str:
    text = ""
    for v in values:
        if not fits(key, text + v + ","):
            break
        text += v + ","
    return text.removesuffix(",")


def layer_annotations(
    ref: str,
    manifest_digest: str,
    layers: Sequence[Descriptor],
    i: int,
    *,
    prefetch_size: int = DEFAULT_PREFETCH_SIZE,
) -> dict[str, str]:
    """Layer ``i``'s descriptor annotations after the stargz and CRI label wrappers ran."""
    layer = layers[i]
    out = dict(layer.annotations)
    rest = [d for d in layers[i:] if is_layer(d.media_type)]
    # ctr-remote's stargz set
    out[STARGZ_REFERENCE] = ref
    out[STARGZ_DIGEST] = layer.digest
    listed = _layer_list(STARGZ_LAYERS, rest, sep_last=True)
    for j, d in enumerate(listed):
        out[f"{URLS_PREFIX}{j}"] = _joined_fitting(f"{URLS_PREFIX}{j}", d.urls)
    out[STARGZ_LAYERS] = ",".join(d.digest for d in listed)
    out[STARGZ_PREFETCH] = str(prefetch_size)
    out[URLS] = _joined_fitting(URLS, layer.urls)
    # containerd's CRI set
    out[CRI_IMAGE_REF] = ref
    out[CRI_LAYER_DIGEST] = layer.digest
    out[CRI_IMAGE_LAYERS] = ",".join(
        d.digest for d in _layer_list(CRI_IMAGE_LAYERS, rest, sep_last=False)
    )
    out[CRI_MANIFEST_DIGEST] = manifest_digest
    return out


def layer_labels(
    ref: str,
    manifest_digest: str,
    layers: Sequence[Descriptor],
    i: int,
    *,
    prefetch_size: int = DEFAULT_PREFETCH_SIZE,
) -> dict[str, str]:
    """The labels containerd passes with the Prepare of layer ``i`` (its inherited
    annotations), but the chain ID (``containerd.io/snapshot.ref``), which needs the config."""
    return inherited(
        layer_annotations(ref, manifest_digest, layers, i, prefetch_size=prefetch_size)
    )


def inherited(annotations: Mapping[str, str]) -> dict[str, str]:
    """The annotations containerd hands to the snapshotter (``FilterInheritedLabels``)."""
    return {
        k: v for k, v in annotations.items() if k == SNAPSHOT_REF or k.startswith(INHERITED_PREFIX)
    }
