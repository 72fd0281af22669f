"""The daemon on the wire: method paths, status codes and messages, streaming, metadata."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf import empty_pb2

from stargz.service.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb

SERVICE = "/containerd.services.snapshots.v1.Snapshots/"
_ns = itertools.count()


@pytest.fixture
def rpc(daemon):
    ch = daemon.channel()
    stub = daemon.stub(ch)
    md = (("containerd-namespace", f"rpc{next(_ns)}"),)
    yield stub, md
    ch.close()


def code_and_details(call, *args, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kw)
    return e.value.code(), e.value.details()


def test_method_paths_are_containerds(daemon):
    """Call every method by its full path with hand-encoded requests, as containerd does."""
    with daemon.channel() as ch:
        md = (("containerd-namespace", "paths"),)

        def call(method, request, response_type):
            fn = ch.unary_unary(
                SERVICE + method,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_type.FromString,
            )
            return fn(request, metadata=md, timeout=10)

        call("Prepare", pb.PrepareSnapshotRequest(key="a"), pb.PrepareSnapshotResponse)
        call("Mounts", pb.MountsRequest(key="a"), pb.MountsResponse)
        call("Usage", pb.UsageRequest(key="a"), pb.UsageResponse)
        call("Commit", pb.CommitSnapshotRequest(key="a", name="A"), empty_pb2.Empty)
        call("Stat", pb.StatSnapshotRequest(key="A"), pb.StatSnapshotResponse)
        call("View", pb.ViewSnapshotRequest(key="v", parent="A"), pb.ViewSnapshotResponse)
        info = pb.Info(name="A", labels={"x": "y"})
        call("Update", pb.UpdateSnapshotRequest(info=info), pb.UpdateSnapshotResponse)
        call("Remove", pb.RemoveSnapshotRequest(key="v"), empty_pb2.Empty)
        call("Cleanup", pb.CleanupRequest(), empty_pb2.Empty)
        stream = ch.unary_stream(
            SERVICE + "List",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.ListSnapshotsResponse.FromString,
        )
        (resp,) = list(stream(pb.ListSnapshotsRequest(), metadata=md, timeout=10))
        assert [(i.name, dict(i.labels)) for i in resp.info] == [("A", {"x": "y"})]


def test_error_codes_and_messages_name_the_key(rpc):
    s, md = rpc
    s.Prepare(pb.PrepareSnapshotRequest(key="act"), metadata=md)
    s.Prepare(pb.PrepareSnapshotRequest(key="b"), metadata=md)
    s.Commit(pb.CommitSnapshotRequest(key="b", name="base"), metadata=md)
    s.View(pb.ViewSnapshotRequest(key="view", parent="base"), metadata=md)
    cases = [
        (s.Stat, pb.StatSnapshotRequest(key="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        (s.Mounts, pb.MountsRequest(key="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        (
            s.Prepare,
            pb.PrepareSnapshotRequest(key="c", parent="missing"),
            grpc.StatusCode.NOT_FOUND,
            "missing",
        ),
        (s.Prepare, pb.PrepareSnapshotRequest(key="act"), grpc.StatusCode.ALREADY_EXISTS, "act"),
        (
            s.Commit,
            pb.CommitSnapshotRequest(key="view", name="V"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "view",
        ),
        (
            s.Remove,
            pb.RemoveSnapshotRequest(key="base"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "base",
        ),
        (
            s.Prepare,
            pb.PrepareSnapshotRequest(key="d", parent="act"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "act",
        ),
    ]
    suffix = {
        grpc.StatusCode.NOT_FOUND: ": not found",
        grpc.StatusCode.ALREADY_EXISTS: ": already exists",
        grpc.StatusCode.FAILED_PRECONDITION: ": failed precondition",
        grpc.StatusCode.INVALID_ARGUMENT: ": invalid argument",
    }
    for call, req, want, key in cases:
        code, details = code_and_details(call, req, metadata=md)
        assert code == want, (req, details)
        assert f'"{key}"' in details and details.endswith(suffix[want]), details


def test_bad_filter_is_invalid_argument(rpc):
    s, md = rpc
    code, details = code_and_details(
        lambda: list(s.List(pb.ListSnapshotsRequest(filters=["name=="]), metadata=md))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "filters" in details


def test_list_streams_in_batches_of_100(rpc):
    s, md = rpc
    for i in range(250):
        s.View(pb.ViewSnapshotRequest(key=f"v{i:03d}"), metadata=md)
    batches = list(s.List(pb.ListSnapshotsRequest(), metadata=md))
    assert [len(b.info) for b in batches] == [100, 100, 50]
    names = [i.name for b in batches for i in b.info]
    assert names == sorted(names) and len(set(names)) == 250


def test_info_fields_on_the_wire(rpc):
    s, md = rpc
    s.Prepare(pb.PrepareSnapshotRequest(key="a", labels={"l": "1"}), metadata=md)
    s.Commit(pb.CommitSnapshotRequest(key="a", name="A", labels={"c": "2"}), metadata=md)
    s.Prepare(pb.PrepareSnapshotRequest(key="b", parent="A"), metadata=md)
    a = s.Stat(pb.StatSnapshotRequest(key="A"), metadata=md).info
    b = s.Stat(pb.StatSnapshotRequest(key="b"), metadata=md).info
    assert (a.name, a.kind, a.parent, dict(a.labels)) == ("A", pb.COMMITTED, "", {"c": "2"})
    assert (b.name, b.kind, b.parent) == ("b", pb.ACTIVE, "A")
    assert a.created_at.seconds > 1_600_000_000 and a.updated_at == a.created_at
    req = pb.UpdateSnapshotRequest(info=pb.Info(name="A", labels={"c": "", "n": "3"}))
    req.update_mask.paths.extend(["labels.c", "labels.n"])
    got = s.Update(req, metadata=md).info
    assert dict(got.labels) == {"n": "3"}
    assert (got.updated_at.seconds, got.updated_at.nanos) > (
        a.updated_at.seconds,
        a.updated_at.nanos,
    )


def test_namespace_comes_from_metadata(daemon):
    with daemon.channel() as ch:
        s = daemon.stub(ch)
        s.Prepare(pb.PrepareSnapshotRequest(key="k"), metadata=(("containerd-namespace", "x1"),))
        code, _ = code_and_details(
            s.Stat, pb.StatSnapshotRequest(key="k"), metadata=(("containerd-namespace", "x2"),)
        )
        assert code == grpc.StatusCode.NOT_FOUND
        s.Stat(pb.StatSnapshotRequest(key="k"), metadata=(("containerd-namespace", "x1"),))


def test_many_concurrent_calls(rpc):
    s, md = rpc

    def layer(i: int) -> str:
        s.Prepare(pb.PrepareSnapshotRequest(key=f"k{i}"), metadata=md)
        s.Commit(pb.CommitSnapshotRequest(key=f"k{i}", name=f"n{i}"), metadata=md)
        m = s.Prepare(pb.PrepareSnapshotRequest(key=f"c{i}", parent=f"n{i}"), metadata=md)
        return m.mounts[0].type

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(layer, range(64))) == ["overlay"] * 64
    infos = [i for b in s.List(pb.ListSnapshotsRequest(), metadata=md) for i in b.info]
    assert len(infos) == 128
