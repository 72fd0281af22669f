"""A client of containerd's own gRPC API (content, images, leases, snapshots, diff).

What ``ctr`` and containerd's Go client send, over the same socket: every call carries the
namespace in the gRPC metadata key ``containerd-namespace`` and, while a lease is held,
its id in ``containerd-lease`` (so what the call creates belongs to the lease and the
garbage collector keeps it). Errors come back as containerd's ``errdefs`` codes and are
turned into :mod:`stargz.errors` here, once, with the method's name in the message.

Snapshot calls go through containerd (its metadata layer namespaces the keys and records
labels), never straight to a snapshotter's socket: the ``snapshotter`` field names the
one to use.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import grpc
from google.protobuf import field_mask_pb2

from stargz import unixsock
from stargz.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StargzError,
    Unavailable,
)
from stargz.remote.manifest import Descriptor
from stargz.service.proto.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from stargz.service.proto.containerd.services.diff.v1 import diff_pb2, diff_pb2_grpc
from stargz.service.proto.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from stargz.service.proto.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from stargz.service.proto.containerd.services.snapshots.v1 import (
    snapshots_pb2,
    snapshots_pb2_grpc,
)
from stargz.service.proto.containerd.types import descriptor_pb2, mount_pb2

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "default"
NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
#: Bytes per content Write message (containerd's server takes up to 16 MiB).
WRITE_CHUNK = 1 << 20
#: Seconds for a call that answers from containerd's metadata (not Apply, not Write).
DEFAULT_TIMEOUT = 60.0

_ERRORS: dict[grpc.StatusCode, type[StargzError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.UNIMPLEMENTED: FailedPrecondition,
}


@dataclass(frozen=True)
class Mount:
    """One mount of a snapshot (``containerd.types.Mount``)."""

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    parent: str
    #: "view", "active" or "committed"
    kind: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ContentInfo:
    digest: str
    size: int
    labels: Mapping[str, str] = field(default_factory=dict)


def _unreachable(address: str, why: str) -> Unavailable:
    return Unavailable(f"cannot reach containerd at {address}: {why}")


def probe(address: str) -> None:
    """Fail with one clear sentence when nothing serves ``address`` (gRPC would only say
    'failed to connect to all addresses')."""
    unixsock.probe(address, "containerd", stale="nothing listens on it (is containerd running?)")


def _descriptor_pb(d: Descriptor) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(
        media_type=d.media_type, digest=d.digest, size=d.size, annotations=dict(d.annotations)
    )


def _descriptor(d: descriptor_pb2.Descriptor) -> Descriptor:
    return Descriptor(d.media_type, d.digest, d.size, dict(d.annotations))


def _mounts(ms: Sequence[mount_pb2.Mount]) -> list[Mount]:
    return [Mount(m.type, m.source, m.target, tuple(m.options)) for m in ms]


def _snapshot_info(i: snapshots_pb2.Info) -> SnapshotInfo:
    kind = snapshots_pb2.Kind.Name(i.kind).lower()
    return SnapshotInfo(i.name, i.parent, kind, dict(i.labels))


class ContainerdClient:
    """containerd's API over its socket, for one namespace. ``async with`` opens it.

    ``lease``: the lease id sent with every call while set (see :meth:`create_lease`).
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if not namespace:
            raise InvalidArgument("empty containerd namespace")
        self.address = os.path.abspath(address)
        self.namespace = namespace
        self.timeout = timeout
        self.lease: str | None = None
        self._channel: grpc.aio.Channel | None = None

    async def __aenter__(self) -> Self:
        self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def open(self) -> None:
        """Check that something serves the socket, then open the channel."""
        probe(self.address)
        self._channel = grpc.aio.insecure_channel(f"unix:{self.address}")
        self.content = content_pb2_grpc.ContentStub(self._channel)
        self.images = images_pb2_grpc.ImagesStub(self._channel)
        self.leases = leases_pb2_grpc.LeasesStub(self._channel)
        self.snapshots = snapshots_pb2_grpc.SnapshotsStub(self._channel)
        self.diff = diff_pb2_grpc.DiffStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    # --- plumbing ---------------------------------------------------------------------

    def metadata(self) -> tuple[tuple[str, str], ...]:
        md = ((NAMESPACE_HEADER, self.namespace),)
        return md + ((LEASE_HEADER, self.lease),) if self.lease else md

    def error(self, what: str, e: grpc.aio.AioRpcError) -> StargzError:
        """The :mod:`stargz.errors` kind for a failed call, naming the call."""
        code = e.code()
        details = " ".join(str(e.details() or code.name).split())
        if code == grpc.StatusCode.UNAVAILABLE and "failed to connect to all addresses" in details:
            return _unreachable(self.address, details)  # (not a snapshotter containerd can't reach)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Unavailable(f"containerd {what}: no answer within {self.timeout:g} s")
        return _ERRORS.get(code, StargzError)(f"containerd {what}: {details}")

    async def _call(self, what: str, method: Any, request: Any, *, timeout: Any = ...) -> Any:
        try:
            return await method(
                request,
                metadata=self.metadata(),
                timeout=self.timeout if timeout is ... else timeout,
            )
        except grpc.aio.AioRpcError as e:
            raise self.error(what, e) from None

    # --- leases -----------------------------------------------------------------------

    async def create_lease(self, lease_id: str, labels: Mapping[str, str]) -> str:
        req = leases_pb2.CreateRequest(id=lease_id, labels=dict(labels))
        resp = await self._call("Leases.Create", self.leases.Create, req)
        return resp.lease.id

    async def delete_lease(self, lease_id: str) -> None:
        req = leases_pb2.DeleteRequest(id=lease_id)
        await self._call("Leases.Delete", self.leases.Delete, req)

    # --- content ----------------------------------------------------------------------

    async def content_info(self, digest: str) -> ContentInfo | None:
        """The blob's info, or None when the content store does not have it."""
        req = content_pb2.InfoRequest(digest=digest)
        try:
            resp = await self._call("Content.Info", self.content.Info, req)
        except NotFound:
            return None
        i = resp.info
        return ContentInfo(i.digest, i.size, dict(i.labels))

    async def update_content_labels(self, digest: str, labels: Mapping[str, str]) -> None:
        """Set these labels on the blob (others are left alone: ``labels.<key>`` paths)."""
        if not labels:
            return
        req = content_pb2.UpdateRequest(
            info=content_pb2.Info(digest=digest, labels=dict(labels)),
            update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels]),
        )
        await self._call("Content.Update", self.content.Update, req)

    def content_writer(self, ref: str, desc: Descriptor) -> ContentWriter:
        """A :class:`ContentWriter` for blob ``desc`` through ingest ``ref``."""
        return ContentWriter(self, ref, desc)

    async def write_content(self, ref: str, desc: Descriptor, source: bytes) -> bool:
        """Write ``source`` as blob ``desc``; False when containerd has it already."""
        async with self.content_writer(ref, desc) as w:
            if not await w.open():
                return False
            for i in range(0, len(source), WRITE_CHUNK):
                await w.write(source[i : i + WRITE_CHUNK])
            await w.commit()
        return True

    # --- snapshots --------------------------------------------------------------------

    async def stat_snapshot(self, snapshotter: str, key: str) -> SnapshotInfo | None:
        """The snapshot's info, or None when there is none by that name."""
        req = snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key)
        try:
            resp = await self._call("Snapshots.Stat", self.snapshots.Stat, req)
        except NotFound:
            return None
        return _snapshot_info(resp.info)

    async def prepare(
        self, snapshotter: str, key: str, parent: str, labels: Mapping[str, str]
    ) -> list[Mount]:
        req = snapshots_pb2.PrepareSnapshotRequest(
            snapshotter=snapshotter, key=key, parent=parent, labels=dict(labels)
        )
        # no deadline: a remote snapshotter may fetch and check a layer's TOC first
        resp = await self._call("Snapshots.Prepare", self.snapshots.Prepare, req, timeout=None)
        return _mounts(resp.mounts)

    async def commit(
        self, snapshotter: str, name: str, key: str, labels: Mapping[str, str]
    ) -> None:
        req = snapshots_pb2.CommitSnapshotRequest(
            snapshotter=snapshotter, name=name, key=key, labels=dict(labels)
        )
        await self._call("Snapshots.Commit", self.snapshots.Commit, req, timeout=None)

    async def remove_snapshot(self, snapshotter: str, key: str) -> None:
        req = snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key)
        await self._call("Snapshots.Remove", self.snapshots.Remove, req)

    # --- diff -------------------------------------------------------------------------

    async def apply(self, desc: Descriptor, mounts: Sequence[Mount]) -> Descriptor:
        """Unpack blob ``desc`` (from the content store) onto ``mounts``; returns the
        descriptor of the uncompressed tar (its digest is the diff ID). No deadline: a
        large layer takes as long as it takes."""
        req = diff_pb2.ApplyRequest(
            diff=_descriptor_pb(desc),
            mounts=[
                mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=m.options)
                for m in mounts
            ],
        )
        resp = await self._call("Diff.Apply", self.diff.Apply, req, timeout=None)
        return _descriptor(resp.applied)

    # --- images -----------------------------------------------------------------------

    async def put_image(self, name: str, target: Descriptor, labels: Mapping[str, str]) -> None:
        """Create the image record, or update it (target and labels) when it exists, as
        containerd's client does after a pull."""
        image = images_pb2.Image(name=name, labels=dict(labels), target=_descriptor_pb(target))
        for _ in range(3):
            try:
                req = images_pb2.CreateImageRequest(image=image)
                await self._call("Images.Create", self.images.Create, req)
                return
            except AlreadyExists:
                pass
            try:
                req = images_pb2.UpdateImageRequest(image=image)
                await self._call("Images.Update", self.images.Update, req)
                return
            except NotFound:  # removed in between: create again
                continue
        raise Unavailable(f"containerd Images: image {name} keeps appearing and disappearing")


class ContentWriter:
    """One ``Content.Write`` stream: ``open`` (STAT), ``write`` pieces, ``commit``.

    containerd checks size and digest at commit. :meth:`restart` goes back to offset 0
    on the same stream (containerd truncates the ingest), so a download that is retried
    writes again without a second stream, which would find the ingest still locked.
    Leaving the ``async with`` without :meth:`commit` cancels the stream: containerd keeps
    the partial ingest (no blob) until its garbage collector drops it.
    """

    def __init__(self, cd: ContainerdClient, ref: str, desc: Descriptor) -> None:
        self.cd = cd
        self.ref = ref
        self.desc = desc
        self.offset = 0
        self.what = f"Content.Write {desc.digest}"
        self._call: Any = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._call is not None and not self._call.done():
            self._call.cancel()

    async def _send(self, **fields: Any) -> content_pb2.WriteContentResponse:
        try:
            await self._call.write(content_pb2.WriteContentRequest(ref=self.ref, **fields))
            resp = await self._call.read()
        except grpc.aio.AioRpcError as e:
            raise self.cd.error(self.what, e) from None
        if resp is grpc.aio.EOF:
            raise Unavailable(f"containerd {self.what}: the stream ended without an answer")
        return resp

    async def open(self) -> bool:
        """Start the ingest; False when the blob exists already (nothing to write)."""
        self._call = self.cd.content.Write(metadata=self.cd.metadata())
        try:
            d = self.desc
            await self._send(action=content_pb2.STAT, total=d.size, expected=d.digest)
        except AlreadyExists:
            return False
        return True

    def restart(self) -> None:
        """The next write goes to offset 0 (containerd truncates what was written)."""
        self.offset = 0

    async def write(self, data: bytes) -> None:
        resp = await self._send(action=content_pb2.WRITE, offset=self.offset, data=data)
        if resp.offset != self.offset + len(data):
            raise StargzError(
                f"containerd {self.what}: at {resp.offset} after writing {len(data)} bytes "
                f"at {self.offset}"
            )
        self.offset = resp.offset

    async def commit(self) -> None:
        """Commit; containerd verifies size and digest. A blob someone else committed
        meanwhile counts as done."""
        d = self.desc
        try:
            resp = await self._send(
                action=content_pb2.COMMIT, total=d.size, expected=d.digest, offset=self.offset
            )
        except AlreadyExists:
            return
        if resp.digest != d.digest or resp.offset != d.size:
            raise StargzError(
                f"containerd {self.what}: committed {resp.digest} of {resp.offset} bytes"
            )
        await self._call.done_writing()
        try:
            # containerd's server sends its last answer once more as it returns
            while await self._call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as e:
            raise self.cd.error(self.what, e) from None
