"""Fixtures for the snapshot tests.

``backend`` runs the snapshot-semantics suite twice: against an in-process
:class:`~stargz.snapshot.Snapshotter`, and against the real ``containerd-stargz-grpc``
process over its unix socket (errors mapped back from gRPC codes, as containerd does).
Both raise :mod:`stargz.errors` classes, so one suite asserts the same behaviour for both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from harness.fixtures import snapshot_daemon  # noqa: F401
from harness.procs import StargzDaemon

from stargz import errors
from stargz.service.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from stargz.service.snapshots import info_from_pb, info_to_pb
from stargz.snapshot import Info, Kind, Mount, Snapshotter, Usage

T = TypeVar("T")

#: These tests cover the snapshotter itself: containerd unpacks every layer.
NO_LAZY = ["--no-lazy"]

_CODES = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
}


@pytest.fixture
def run() -> Iterator[Callable[[Coroutine[Any, Any, T]], T]]:
    """Run a coroutine on this test's event loop."""
    loop = asyncio.new_event_loop()
    try:
        yield loop.run_until_complete
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


class FakeFS:
    """A FileSystem that records calls; set ``fail_mount``/``fail_check`` to refuse."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.labels: dict[str, Mapping[str, str]] = {}
        self.fail_mount: Exception | None = None
        self.fail_check: Exception | None = None
        self.fail_unmount: Exception | None = None

    async def mount(self, mountpoint: str, labels: Mapping[str, str]) -> None:
        self.calls.append(("mount", mountpoint))
        if self.fail_mount is not None:
            raise self.fail_mount
        self.labels[mountpoint] = dict(labels)
        Path(mountpoint, "remote-layer-marker").write_text("lazy")

    async def check(self, mountpoint: str, labels: Mapping[str, str]) -> None:
        self.calls.append(("check", mountpoint))
        if self.fail_check is not None:
            raise self.fail_check

    async def unmount(self, mountpoint: str) -> None:
        self.calls.append(("unmount", mountpoint))
        if self.fail_unmount is not None:
            raise self.fail_unmount


class LocalBackend:
    """The Snapshotter in this process."""

    name = "local"
    #: What this backend puts before every key (see RPCBackend).
    prefix = ""

    def __init__(self, sn: Snapshotter, run: Callable[[Coroutine[Any, Any, Any]], Any]) -> None:
        self.sn, self._run, self.root = sn, run, sn.root

    def prepare(
        self,
        key: str,
        parent: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> list[Mount]:
        return self._run(self.sn.prepare(key, parent, labels))

    def view(
        self,
        key: str,
        parent: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> list[Mount]:
        return self._run(self.sn.view(key, parent, labels))

    def mounts(self, key: str) -> list[Mount]:
        return self._run(self.sn.mounts(key))

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        self._run(self.sn.commit(name, key, labels))

    def remove(self, key: str) -> None:
        self._run(self.sn.remove(key))

    def stat(self, key: str) -> Info:
        return self._run(self.sn.stat(key))

    def update(self, info: Info, paths: Sequence[str] = ()) -> Info:
        return self._run(self.sn.update(info, paths))

    def list(self, *filters: str) -> list[Info]:
        return self._run(self.sn.walk(filters))

    def usage(self, key: str) -> Usage:
        return self._run(self.sn.usage(key))

    def cleanup(self) -> None:
        self._run(self.sn.cleanup())


class RPCBackend:
    """The daemon process, over gRPC, shared by the tests of a module.

    Like containerd's metadata layer, each backend puts its own prefix before every key it
    sends (``rpc<n>-<pid>-``) and takes it off what comes back (names, parents, error messages,
    and ``List``, which only shows this backend's snapshots), so tests on one daemon never
    meet each other's keys. Requests carry no ``containerd-namespace`` metadata, as
    containerd's requests from ``ctr`` don't.
    """

    name = "rpc"
    _counter = itertools.count()

    def __init__(self, daemon: StargzDaemon) -> None:
        self.daemon = daemon
        self.root = daemon.root
        self.channel = daemon.channel()
        self.stub = daemon.stub(self.channel)
        self.prefix = f"rpc{next(self._counter)}-{os.getpid()}-"

    def _in(self, key: str) -> str:
        return self.prefix + key if key else key

    def _out(self, key: str) -> str:
        return key.removeprefix(self.prefix)

    def _raise(self, e: grpc.RpcError) -> None:
        cls = _CODES.get(e.code())
        if cls is None:
            raise e
        raise cls((e.details() or "").replace(self.prefix, "")) from None

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self.stub, method)(request, timeout=30)
        except grpc.RpcError as e:
            self._raise(e)

    @staticmethod
    def _mounts(resp: Any) -> list[Mount]:
        return [Mount(m.type, m.source, tuple(m.options), m.target) for m in resp.mounts]

    def _info(self, pbinfo: Any) -> Info:
        info = info_from_pb(pbinfo)
        return dataclasses.replace(info, name=self._out(info.name), parent=self._out(info.parent))

    def prepare(
        self,
        key: str,
        parent: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> list[Mount]:
        req = pb.PrepareSnapshotRequest(
            key=self._in(key), parent=self._in(parent), labels=labels or {}
        )
        return self._mounts(self._call("Prepare", req))

    def view(
        self,
        key: str,
        parent: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> list[Mount]:
        req = pb.ViewSnapshotRequest(
            key=self._in(key), parent=self._in(parent), labels=labels or {}
        )
        return self._mounts(self._call("View", req))

    def mounts(self, key: str) -> list[Mount]:
        return self._mounts(self._call("Mounts", pb.MountsRequest(key=self._in(key))))

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        req = pb.CommitSnapshotRequest(name=self._in(name), key=self._in(key), labels=labels or {})
        self._call("Commit", req)

    def remove(self, key: str) -> None:
        self._call("Remove", pb.RemoveSnapshotRequest(key=self._in(key)))

    def stat(self, key: str) -> Info:
        return self._info(self._call("Stat", pb.StatSnapshotRequest(key=self._in(key))).info)

    def update(self, info: Info, paths: Sequence[str] = ()) -> Info:
        sent = dataclasses.replace(info, name=self._in(info.name))
        req = pb.UpdateSnapshotRequest(info=info_to_pb(sent))
        req.update_mask.paths.extend(paths)
        return self._info(self._call("Update", req).info)

    def list(self, *filters: str) -> list[Info]:
        """This backend's snapshots that match (filters naming keys must add ``prefix``)."""
        req = pb.ListSnapshotsRequest(filters=list(filters))
        try:
            stream = list(self.stub.List(req, timeout=30))
        except grpc.RpcError as e:
            self._raise(e)
        mine = [i for resp in stream for i in resp.info if i.name.startswith(self.prefix)]
        return [self._info(i) for i in mine]

    def usage(self, key: str) -> Usage:
        r = self._call("Usage", pb.UsageRequest(key=self._in(key)))
        return Usage(r.size, r.inodes)

    def cleanup(self) -> None:
        self._call("Cleanup", pb.CleanupRequest())


@pytest.fixture(scope="module")
def daemon(snapshot_daemon: StargzDaemon) -> StargzDaemon:  # noqa: F811
    return snapshot_daemon


@pytest.fixture
def local(tmp_path: Path, run: Callable[..., Any]) -> Iterator[LocalBackend]:
    sn = run(Snapshotter.open(tmp_path / "root"))
    try:
        yield LocalBackend(sn, run)
    finally:
        run(sn.close())


@pytest.fixture(params=["local", "rpc"])
def backend(request: pytest.FixtureRequest) -> Iterator[LocalBackend | RPCBackend]:
    if request.param == "local":
        yield request.getfixturevalue("local")
        return
    b = RPCBackend(request.getfixturevalue("daemon"))
    try:
        yield b
    finally:
        b.channel.close()


def upper(root: str, mount_source: str) -> str:
    """The snapshot id from a bind mount source (``<root>/snapshots/<id>/fs``)."""
    rel = os.path.relpath(mount_source, os.path.join(root, "snapshots"))
    return rel.split(os.sep)[0]


__all__ = ["FakeFS", "Kind", "LocalBackend", "RPCBackend", "upper"]


#: The table exactly as schema 1 daemons created it.
SCHEMA_1 = """
CREATE TABLE snapshots (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT    NOT NULL,
    key       TEXT    NOT NULL,
    kind      INTEGER NOT NULL,
    parent_id INTEGER REFERENCES snapshots (id),
    labels    TEXT    NOT NULL DEFAULT '{}',
    created   INTEGER NOT NULL,
    updated   INTEGER NOT NULL,
    size      INTEGER NOT NULL DEFAULT 0,
    inodes    INTEGER NOT NULL DEFAULT 0,
    UNIQUE (namespace, key)
);
CREATE INDEX snapshots_parent ON snapshots (parent_id);
"""
