"""containerd's Snapshots gRPC service over a :class:`stargz.snapshot.Snapshotter`.

Like containerd's ``contrib/snapshotservice``, the request's ``snapshotter`` field is
ignored: this daemon serves one snapshotter. The gRPC metadata ``containerd-namespace`` is
logged with each call and nothing else: keys live in one key space, whichever namespace a
request names or whether it names one at all (see :mod:`stargz.snapshot.types`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from stargz.snapshot import Info, Kind, Mount, Snapshotter

from .errors import grpc_errors, to_status
from .proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from .proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from .proto.containerd.types import mount_pb2

log = logging.getLogger("stargz.service")

NAMESPACE_METADATA_KEY = "containerd-namespace"
#: Infos per ListSnapshotsResponse, as containerd's snapshotservice batches them.
LIST_BATCH = 100


def namespace_of(context: grpc.aio.ServicerContext) -> str | None:
    """The request's ``containerd-namespace`` metadata, for the log only."""
    for k, v in context.invocation_metadata() or ():
        if k == NAMESPACE_METADATA_KEY:
            return v if isinstance(v, str) else v.decode()
    return None


def _mounts_pb(mounts: Iterable[Mount]) -> list[mount_pb2.Mount]:
    return [
        mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))
        for m in mounts
    ]


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def info_to_pb(info: Info) -> pb.Info:
    return pb.Info(
        name=info.name,
        parent=info.parent,
        kind=int(info.kind),
        created_at=_timestamp(info.created_ns),
        updated_at=_timestamp(info.updated_ns),
        labels=dict(info.labels),
    )


def _kind(value: int) -> Kind:
    try:
        return Kind(value)
    except ValueError:
        return Kind.UNKNOWN


def info_from_pb(info: pb.Info) -> Info:
    return Info(
        name=info.name,
        parent=info.parent,
        kind=_kind(info.kind),
        labels=dict(info.labels),
        created_ns=info.created_at.seconds * 1_000_000_000 + info.created_at.nanos,
        updated_ns=info.updated_at.seconds * 1_000_000_000 + info.updated_at.nanos,
    )


class _Logged:
    """Logs each call at debug level: method, namespace (as sent), key, duration, outcome."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext, **fields: str) -> None:
        self.method, self.context, self.fields = method, context, fields
        self.ns = namespace_of(context)

    def __enter__(self) -> _Logged:
        self.start = time.perf_counter()
        return self

    def __exit__(self, typ: object, err: BaseException | None, tb: object) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            return
        fields: dict[str, object] = {"method": self.method, "namespace": self.ns, **self.fields}
        if err is None:
            fields["code"] = "OK"
        else:
            code, fields["error"] = to_status(err)
            fields["code"] = code.name
        fields["duration_ms"] = round((time.perf_counter() - self.start) * 1e3, 3)
        log.debug("rpc", extra=fields)


class SnapshotsService(pb_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    @grpc_errors
    async def Prepare(self, request: pb.PrepareSnapshotRequest, context):
        with _Logged(
            "Prepare",
            context,
            key=request.key,
            parent=request.parent,
            labels=sorted(request.labels),
        ):
            mounts = await self.sn.prepare(request.key, request.parent, request.labels)
        return pb.PrepareSnapshotResponse(mounts=_mounts_pb(mounts))

    @grpc_errors
    async def View(self, request: pb.ViewSnapshotRequest, context):
        with _Logged("View", context, key=request.key, parent=request.parent):
            mounts = await self.sn.view(request.key, request.parent, request.labels)
        return pb.ViewSnapshotResponse(mounts=_mounts_pb(mounts))

    @grpc_errors
    async def Mounts(self, request: pb.MountsRequest, context):
        with _Logged("Mounts", context, key=request.key):
            mounts = await self.sn.mounts(request.key)
        return pb.MountsResponse(mounts=_mounts_pb(mounts))

    @grpc_errors
    async def Commit(self, request: pb.CommitSnapshotRequest, context):
        with _Logged("Commit", context, key=request.key, **{"commit-name": request.name}):
            await self.sn.commit(request.name, request.key, request.labels)
        return empty_pb2.Empty()

    @grpc_errors
    async def Remove(self, request: pb.RemoveSnapshotRequest, context):
        with _Logged("Remove", context, key=request.key):
            await self.sn.remove(request.key)
        return empty_pb2.Empty()

    @grpc_errors
    async def Stat(self, request: pb.StatSnapshotRequest, context):
        with _Logged("Stat", context, key=request.key):
            info = await self.sn.stat(request.key)
        return pb.StatSnapshotResponse(info=info_to_pb(info))

    @grpc_errors
    async def Update(self, request: pb.UpdateSnapshotRequest, context):
        with _Logged("Update", context, key=request.info.name):
            info = await self.sn.update(info_from_pb(request.info), list(request.update_mask.paths))
        return pb.UpdateSnapshotResponse(info=info_to_pb(info))

    @grpc_errors
    async def List(
        self, request: pb.ListSnapshotsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ListSnapshotsResponse]:
        with _Logged("List", context, filters=",".join(request.filters)):
            infos = await self.sn.walk(list(request.filters))
        for i in range(0, len(infos), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[info_to_pb(x) for x in infos[i : i + LIST_BATCH]])

    @grpc_errors
    async def Usage(self, request: pb.UsageRequest, context):
        with _Logged("Usage", context, key=request.key):
            usage = await self.sn.usage(request.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    @grpc_errors
    async def Cleanup(self, request: pb.CleanupRequest, context):
        with _Logged("Cleanup", context):
            await self.sn.cleanup()
        return empty_pb2.Empty()
