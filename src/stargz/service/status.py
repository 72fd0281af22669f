"""``stargz.v1.Status``: what the daemon is doing, for ``stargz status``.

Served on the daemon's gRPC socket next to containerd's Snapshots service, so it is as
private as that socket (0600, root only) and needs no second listener. ``Get`` answers
from memory: the filesystem's open layers and their counters, the snapshotter's last
refusals, and (to name the snapshots a layer backs) one read transaction of the snapshot
metadata. It never changes anything.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import grpc

from stargz import __version__
from stargz.remote.redact import redact_text
from stargz.snapshot import Snapshotter

from .errors import grpc_errors
from .proto.stargz.v1 import status_pb2 as pb
from .proto.stargz.v1 import status_pb2_grpc as pb_grpc


def _layer_labels(labels: Mapping[str, str]) -> tuple[str, str]:
    """(digest, image reference) the Prepare's labels name, as the FileSystem reads them."""
    # (imported here: a daemon without lazy pulling never loads the filesystem package)
    from stargz.fs.source import (
        CRI_IMAGE_REF_LABEL,
        CRI_LAYER_DIGEST_LABEL,
        STARGZ_DIGEST_LABEL,
        STARGZ_REFERENCE_LABEL,
    )

    for ref_key, digest_key in (
        (CRI_IMAGE_REF_LABEL, CRI_LAYER_DIGEST_LABEL),
        (STARGZ_REFERENCE_LABEL, STARGZ_DIGEST_LABEL),
    ):
        if labels.get(ref_key) and labels.get(digest_key):
            return labels[digest_key], labels[ref_key]
    return (
        labels.get(CRI_LAYER_DIGEST_LABEL) or labels.get(STARGZ_DIGEST_LABEL) or "",
        labels.get(CRI_IMAGE_REF_LABEL) or labels.get(STARGZ_REFERENCE_LABEL) or "",
    )


def layer_pb(
    layer: Any, ref: str, repository: str, mountpoints: tuple[str, ...], names: Mapping[str, str]
) -> pb.LayerStatus:
    """One open layer (a `stargz.fs.Layer`) as the status message shows it."""
    m = layer.metrics
    fetched = layer.fetched_size()
    return pb.LayerStatus(
        digest=layer.digest,
        ref=redact_text(ref),
        repository=repository,
        snapshots=[pb.SnapshotMount(name=names.get(mp, ""), mountpoint=mp) for mp in mountpoints],
        size=layer.size,
        fetched_size=fetched,
        fetched_percent=fetched * 100.0 / layer.size if layer.size else 100.0,
        cache_hits=m.cache_hits,
        cache_misses=m.cache_misses,
        verification_failures=m.verification_failures,
        read_errors=m.read_errors,
        last_error=m.last_error,
        last_error_time=m.last_error_time,
        prefetch_done=layer.prefetch_done.is_set(),
        fetch_requests=m.fetch_requests,
        fetched_bytes=m.fetched_bytes,
    )


async def build_status(snapshotter: Snapshotter, fs: Any, started: float) -> pb.GetStatusResponse:
    """The whole answer of ``Get`` (``started``: the daemon's start, ``time.monotonic``)."""
    layers = []
    lazy = fs is not None and hasattr(fs, "layer_status")
    if lazy:
        open_layers = fs.layer_status()  # (on the loop: the table does not change under us)
        names = await snapshotter.remote_snapshot_names() if open_layers else {}
        layers = [layer_pb(*entry, names) for entry in open_layers]
        layers.sort(key=lambda x: (x.ref, x.digest))
    refused = []
    for r in snapshotter.refusals:
        digest, ref = _layer_labels(r.labels)
        refused.append(
            pb.RefusedLayer(
                digest=digest,
                ref=redact_text(ref),
                snapshot=r.snapshot,
                key=r.key,
                reason=r.reason,
                reason_text=r.reason_text,
                error=redact_text(r.error),
                time=r.time,
                count=r.count,
            )
        )
    daemon = pb.DaemonStatus(
        version=__version__,
        pid=os.getpid(),
        root=snapshotter.root,
        lazy=lazy,
        uptime_seconds=time.monotonic() - started,
        fallbacks=dict(snapshotter.fallbacks),
    )
    return pb.GetStatusResponse(daemon=daemon, layers=layers, refused=refused)


class StatusService(pb_grpc.StatusServicer):
    """The servicer; ``fs`` is the daemon's FileSystem (None without lazy pulling)."""

    def __init__(self, snapshotter: Snapshotter, fs: Any, started: float | None = None) -> None:
        self.snapshotter = snapshotter
        self.fs = fs
        self.started = time.monotonic() if started is None else started

    @grpc_errors
    async def Get(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStatusResponse:
        return await build_status(self.snapshotter, self.fs, self.started)


def add_to_server(server: grpc.aio.Server, snapshotter: Snapshotter, fs: Any) -> None:
    pb_grpc.add_StatusServicer_to_server(StatusService(snapshotter, fs), server)
