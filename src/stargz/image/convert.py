"""Convert every layer of an image in an OCI layout to eStargz or zstd:chunked.

The converted image gets a new config (``rootfs.diff_ids`` of the new layers) and an OCI
manifest whose layer descriptors carry the annotations a lazy puller needs:
``containerd.io/snapshot/stargz/toc.digest`` and ``io.containers.estargz.uncompressed-size``
(and the two ``io.containers.zstd-chunked.*`` ones for zstd:chunked).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stargz.errors import InvalidArgument
from stargz.estargz import writer
from stargz.image.layout import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MT_OCI_CONFIG,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    Layout,
    parse_ref,
)

LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
}


@dataclass
class ConvertOptions:
    compression: str = "gzip"
    chunk_size: int = writer.DEFAULT_CHUNK_SIZE
    level: int | None = None
    prioritized_files: list[str] = field(default_factory=list)
    workers: int | None = None
    #: Per layer (index in the manifest's ``layers``): its files in first-access order.
    #: When set, it replaces ``prioritized_files``; a layer it does not list gets none
    #: (``.no.prefetch.landmark``). ``stargz optimize`` and ``--record-in`` fill it.
    layer_files: dict[int, list[str]] | None = None


@dataclass
class LayerStat:
    src_digest: str
    dst_digest: str
    src_size: int
    dst_size: int
    uncompressed_size: int
    seconds: float


Progress = Callable[[LayerStat], None]


def convert(
    src: str,
    dst: str,
    opts: ConvertOptions,
    progress: Progress | None = None,
    *,
    manifest: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[LayerStat]]:
    """Convert ``oci:DIR:TAG`` into ``oci:DIR:TAG``; returns the new descriptor and stats.

    ``manifest``: convert this descriptor of the source (one platform's manifest, as
    `source_image` chose it) instead of what the tag points at.
    """
    sref, dref = parse_ref(src), parse_ref(dst)
    slayout = Layout(sref.path)
    dlayout = Layout(dref.path, create=True)
    conv = _Converter(slayout, dlayout, opts, progress)
    desc = conv.descriptor(manifest or slayout.resolve(sref.tag))
    dlayout.tag(desc, dref.tag)
    return desc, conv.stats


class _Converter:
    def __init__(self, src: Layout, dst: Layout, opts: ConvertOptions, progress) -> None:
        self.src, self.dst, self.opts, self.progress = src, dst, opts, progress
        self.stats: list[LayerStat] = []
        # (src digest, prioritized files) -> (desc, diffID)
        self._done: dict[tuple[str, tuple[str, ...]], tuple[dict[str, Any], str]] = {}

    def descriptor(self, desc: dict[str, Any]) -> dict[str, Any]:
        mt = desc.get("mediaType")
        if mt in INDEX_TYPES:
            return self.index(desc)
        if mt in MANIFEST_TYPES:
            return self.manifest(desc)
        raise InvalidArgument(f"cannot convert {desc.get('digest')}: media type {mt!r}")

    def index(self, desc: dict[str, Any]) -> dict[str, Any]:
        idx = self.src.read_json(desc["digest"])
        out = dict(idx)
        out["mediaType"] = MT_OCI_INDEX
        out["manifests"] = [self.descriptor(d) for d in idx.get("manifests") or []]
        digest, size = self.dst.put_json(out)
        return {**_keep(desc), "mediaType": MT_OCI_INDEX, "digest": digest, "size": size}

    def manifest(self, desc: dict[str, Any]) -> dict[str, Any]:
        man = self.src.read_json(desc["digest"])
        layers = man.get("layers")
        if not isinstance(layers, list):
            raise InvalidArgument(f"manifest {desc['digest']} has no layers list")
        config = self.src.read_json(man["config"]["digest"])
        new_layers, diff_ids = [], []
        for i, layer in enumerate(layers):
            new, diff_id = self.layer(layer, self._files(i))
            new_layers.append(new)
            diff_ids.append(diff_id)
        config = dict(config)
        config["rootfs"] = {**(config.get("rootfs") or {}), "type": "layers", "diff_ids": diff_ids}
        cdigest, csize = self.dst.put_json(config)
        out = {
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": {"mediaType": MT_OCI_CONFIG, "digest": cdigest, "size": csize},
            "layers": new_layers,
        }
        if man.get("annotations"):
            out["annotations"] = man["annotations"]
        digest, size = self.dst.put_json(out)
        return {**_keep(desc), "mediaType": MT_OCI_MANIFEST, "digest": digest, "size": size}

    def _files(self, index: int) -> list[str]:
        if self.opts.layer_files is None:
            return self.opts.prioritized_files
        return self.opts.layer_files.get(index, [])

    def layer(self, desc: dict[str, Any], files: list[str]) -> tuple[dict[str, Any], str]:
        sdigest = desc.get("digest", "")
        done_key = (sdigest, tuple(files))
        if done_key in self._done:
            return self._done[done_key]
        if desc.get("mediaType") not in LAYER_TYPES:
            raise InvalidArgument(
                f"layer {sdigest}: unsupported media type {desc.get('mediaType')!r}"
            )
        start = time.perf_counter()
        tmp = self.dst.new_blob()
        try:
            with self.src.open_blob(sdigest) as f:
                res = writer.build(
                    f,
                    tmp,
                    compression=self.opts.compression,
                    chunk_size=self.opts.chunk_size,
                    level=self.opts.level,
                    prioritized_files=files,
                    allow_missing_prioritized=True,
                    workers=self.opts.workers,
                    tmpdir=os.path.dirname(tmp.name),
                )
            self.dst.commit_blob(tmp, res.blob_digest)
        except BaseException:
            tmp.close()
            os.unlink(tmp.name)
            raise
        annotations = {
            k: v
            for k, v in (desc.get("annotations") or {}).items()
            if not k.startswith(("containerd.io/snapshot/stargz/", "io.containers."))
        }
        annotations.update(res.annotations)
        new = {
            "mediaType": res.media_type,
            "digest": res.blob_digest,
            "size": res.blob_size,
            "annotations": annotations,
        }
        stat = LayerStat(
            sdigest,
            res.blob_digest,
            int(desc.get("size", 0)),
            res.blob_size,
            res.uncompressed_size,
            time.perf_counter() - start,
        )
        self.stats.append(stat)
        if self.progress:
            self.progress(stat)
        self._done[done_key] = (new, res.diff_id)
        return new, res.diff_id


def _keep(desc: dict[str, Any]) -> dict[str, Any]:
    """Descriptor fields that survive conversion (platform, annotations)."""
    return {k: v for k, v in desc.items() if k in ("platform", "annotations")}
