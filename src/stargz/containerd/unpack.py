"""Unpacking an image's layers into a snapshotter through containerd, asking the
snapshotter for a remote (lazy) snapshot of each layer first.

This is containerd's unpacker (v1.6 ``unpacker.go``), one layer after another:

1. ``Stat(chainID)``: when that snapshot exists, the layer is there already.
2. ``Prepare(key="extract-<unique> <chainID>", parent=<parent chainID>, labels)``, the
   labels being the layer's inherited annotations (:mod:`stargz.containerd.labels`) and
   ``containerd.io/snapshot.ref=<chainID>``. ``ALREADY_EXISTS`` followed by a successful
   ``Stat(chainID)`` means the snapshotter provides the layer remotely: nothing is
   fetched. ``ALREADY_EXISTS`` without that snapshot is retried with a new key (3 tries).
3. Otherwise the layer is pulled normally: its blob is streamed into the content store (unless it
   is there), ``Diff.Apply`` unpacks it onto the prepared mounts, the diff ID it reports
   must be the config's, ``Commit(name=chainID, key, labels)``, and the blob is labelled
   ``containerd.io/uncompressed=<diff ID>``. A failure removes the extraction snapshot.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from stargz.containerd import labels as L
from stargz.containerd.client import ContainerdClient
from stargz.containerd.content import label_blob
from stargz.containerd.fetch import Image, download_blob
from stargz.containerd.identity import chain_ids
from stargz.errors import AlreadyExists, DigestMismatch, StargzError, Unavailable
from stargz.remote.client import RegistryClient
from stargz.remote.manifest import Descriptor

log = logging.getLogger("stargz.containerd")

LAZY = "lazy"
UNPACKED = "unpacked"
PRESENT = "present"
#: Prepare attempts when the snapshotter says "exists" but the chain is not found.
PREPARE_TRIES = 3


@dataclass(frozen=True)
class LayerResult:
    index: int
    digest: str
    chain_id: str
    #: :data:`LAZY` (a remote snapshot), :data:`UNPACKED` or :data:`PRESENT` (the chain
    #: existed before this pull).
    how: str
    #: Bytes of the blob downloaded from the registry.
    fetched: int = 0


def unique_part() -> str:
    """containerd's ``uniquePart``: nanoseconds of the second and 3 random bytes."""
    ns = time.time_ns() % 1_000_000_000
    return f"{ns}-{base64.urlsafe_b64encode(os.urandom(3)).decode()}"


def extract_key(chain_id: str) -> str:
    """``snapshots.UnpackKeyFormat``: ``extract-%s %s``."""
    return f"extract-{unique_part()} {chain_id}"


class Unpacker:
    """Unpacks :class:`Image`'s layers in order; see the module docstring."""

    def __init__(
        self,
        cd: ContainerdClient,
        registry: RegistryClient,
        image: Image,
        snapshotter: str,
        *,
        prefetch_size: int = L.DEFAULT_PREFETCH_SIZE,
        on_layer: Callable[[LayerResult], None] | None = None,
    ) -> None:
        self.cd = cd
        self.registry = registry
        self.image = image
        self.snapshotter = snapshotter
        self.prefetch_size = prefetch_size
        self.on_layer = on_layer
        self.chain = chain_ids(image.diff_ids)

    async def run(self) -> list[LayerResult]:
        out = []
        for i in range(len(self.image.layers)):
            res = await self.layer(i)
            out.append(res)
            if self.on_layer is not None:
                self.on_layer(res)
        return out

    def snapshot_labels(self, i: int) -> dict[str, str]:
        img = self.image
        labels = L.layer_labels(
            str(img.ref),
            img.manifest.desc.digest,
            img.layers,
            i,
            prefetch_size=self.prefetch_size,
        )
        labels[L.SNAPSHOT_REF] = self.chain[i]
        return labels

    async def layer(self, i: int) -> LayerResult:
        desc = self.image.layers[i]
        chain_id = self.chain[i]
        parent = self.chain[i - 1] if i else ""
        sn = self.snapshotter
        if await self.cd.stat_snapshot(sn, chain_id) is not None:
            return LayerResult(i, desc.digest, chain_id, PRESENT)
        labels = self.snapshot_labels(i)
        for _ in range(PREPARE_TRIES):
            key = extract_key(chain_id)
            try:
                mounts = await self.cd.prepare(sn, key, parent, labels)
                break
            except AlreadyExists:
                if await self.cd.stat_snapshot(sn, chain_id) is not None:
                    log.debug("remote snapshot", extra={"layer": desc.digest, "chain": chain_id})
                    return LayerResult(i, desc.digest, chain_id, LAZY)
                log.debug("extraction snapshot exists, chain not found", extra={"key": key})
        else:
            raise Unavailable(
                f"snapshotter {sn}: layer {desc.digest} neither prepared nor found as "
                f"{chain_id} after {PREPARE_TRIES} tries"
            )
        try:
            fetched = await self.fetch(desc)
            applied = await self.cd.apply(desc, mounts)
            if applied.digest != self.image.diff_ids[i]:
                raise DigestMismatch(
                    f"layer {desc.digest} unpacks to {applied.digest}, "
                    f"the image config says {self.image.diff_ids[i]}"
                )
            await self.cd.commit(sn, chain_id, key, labels)
        except BaseException as e:
            with contextlib.suppress(StargzError):
                await self.cd.remove_snapshot(sn, key)
            if isinstance(e, AlreadyExists):  # committed by someone else meanwhile
                return LayerResult(i, desc.digest, chain_id, PRESENT)
            raise
        await self.cd.update_content_labels(desc.digest, {L.UNCOMPRESSED: applied.digest})
        return LayerResult(i, desc.digest, chain_id, UNPACKED, fetched)

    async def fetch(self, desc: Descriptor) -> int:
        """The layer blob into containerd's content store, streamed from the registry
        (nothing on local disk); returns the bytes downloaded."""
        cd, ref = self.cd, self.image.ref
        async with cd.content_writer(L.ingest_ref(desc), desc) as w:
            fetched = 0
            if await w.open():
                await download_blob(self.registry, ref, desc, w)
                await w.commit()
                fetched = desc.size
        await label_blob(cd, ref, desc.digest)
        return fetched
