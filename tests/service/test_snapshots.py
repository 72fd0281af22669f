"""The daemon on the wire: method paths, status codes and messages, streaming, metadata."""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf import empty_pb2

from stargz.service.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb

SERVICE = "/containerd.services.snapshots.v1.Snapshots/"
_tests = itertools.count()


def unique_prefix() -> str:
    """Tests share one daemon: each puts its own prefix before its keys (as containerd's
    metadata layer puts ``<namespace>/<n>/``) and lists only those."""
    return f"t{next(_tests)}-{os.getpid()}-"


@pytest.fixture
def rpc(snapshot_daemon):
    """(stub, k): ``k("a")`` is this test's key ``a``."""
    ch = snapshot_daemon.channel()
    stub = snapshot_daemon.stub(ch)
    p = unique_prefix()
    yield stub, lambda key: p + key
    ch.close()


def mine(k) -> list[str]:
    """The List filter that keeps this test's keys only."""
    return [f"name~=^{k('')}"]


def code_and_details(call, *args, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kw)
    return e.value.code(), e.value.details()


def test_method_paths_are_containerds(snapshot_daemon):
    """Call every method by its full path with hand-encoded requests, as containerd does."""
    p = unique_prefix()
    with snapshot_daemon.channel() as ch:

        def call(method, request, response_type):
            fn = ch.unary_unary(
                SERVICE + method,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_type.FromString,
            )
            return fn(request, timeout=10)

        a, big_a, v = p + "a", p + "A", p + "v"
        call("Prepare", pb.PrepareSnapshotRequest(key=a), pb.PrepareSnapshotResponse)
        call("Mounts", pb.MountsRequest(key=a), pb.MountsResponse)
        call("Usage", pb.UsageRequest(key=a), pb.UsageResponse)
        call("Commit", pb.CommitSnapshotRequest(key=a, name=big_a), empty_pb2.Empty)
        call("Stat", pb.StatSnapshotRequest(key=big_a), pb.StatSnapshotResponse)
        call("View", pb.ViewSnapshotRequest(key=v, parent=big_a), pb.ViewSnapshotResponse)
        info = pb.Info(name=big_a, labels={"x": "y"})
        call("Update", pb.UpdateSnapshotRequest(info=info), pb.UpdateSnapshotResponse)
        call("Remove", pb.RemoveSnapshotRequest(key=v), empty_pb2.Empty)
        call("Cleanup", pb.CleanupRequest(), empty_pb2.Empty)
        stream = ch.unary_stream(
            SERVICE + "List",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.ListSnapshotsResponse.FromString,
        )
        req = pb.ListSnapshotsRequest(filters=[f"name~=^{p}"])
        (resp,) = list(stream(req, timeout=10))
        assert [(i.name, dict(i.labels)) for i in resp.info] == [(big_a, {"x": "y"})]


def test_error_codes_and_messages_name_the_key(rpc):
    s, k = rpc
    s.Prepare(pb.PrepareSnapshotRequest(key=k("act")))
    s.Prepare(pb.PrepareSnapshotRequest(key=k("b")))
    s.Commit(pb.CommitSnapshotRequest(key=k("b"), name=k("base")))
    s.View(pb.ViewSnapshotRequest(key=k("view"), parent=k("base")))
    cases = [
        (s.Stat, pb.StatSnapshotRequest(key=k("nope")), grpc.StatusCode.NOT_FOUND, "nope"),
        (s.Mounts, pb.MountsRequest(key=k("nope")), grpc.StatusCode.NOT_FOUND, "nope"),
        (
            s.Prepare,
            pb.PrepareSnapshotRequest(key=k("c"), parent=k("missing")),
            grpc.StatusCode.NOT_FOUND,
            "missing",
        ),
        (
            s.Prepare,
            pb.PrepareSnapshotRequest(key=k("act")),
            grpc.StatusCode.ALREADY_EXISTS,
            "act",
        ),
        (
            s.Commit,
            pb.CommitSnapshotRequest(key=k("view"), name=k("V")),
            grpc.StatusCode.FAILED_PRECONDITION,
            "view",
        ),
        (
            s.Remove,
            pb.RemoveSnapshotRequest(key=k("base")),
            grpc.StatusCode.FAILED_PRECONDITION,
            "base",
        ),
        (
            s.Prepare,
            pb.PrepareSnapshotRequest(key=k("d"), parent=k("act")),
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
        code, details = code_and_details(call, req)
        assert code == want, (req, details)
        assert f'"{k(key)}"' in details and details.endswith(suffix[want]), details


def test_bad_filter_is_invalid_argument(rpc):
    s, _ = rpc
    code, details = code_and_details(
        lambda: list(s.List(pb.ListSnapshotsRequest(filters=["name=="])))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "filters" in details


def test_list_streams_in_batches_of_100(rpc):
    s, k = rpc
    for i in range(250):
        s.View(pb.ViewSnapshotRequest(key=k(f"v{i:03d}")))
    batches = list(s.List(pb.ListSnapshotsRequest(filters=mine(k))))
    assert [len(b.info) for b in batches] == [100, 100, 50]
    names = [i.name for b in batches for i in b.info]
    assert names == sorted(names) and len(set(names)) == 250


def test_info_fields_on_the_wire(rpc):
    s, k = rpc
    s.Prepare(pb.PrepareSnapshotRequest(key=k("a"), labels={"l": "1"}))
    s.Commit(pb.CommitSnapshotRequest(key=k("a"), name=k("A"), labels={"c": "2"}))
    s.Prepare(pb.PrepareSnapshotRequest(key=k("b"), parent=k("A")))
    a = s.Stat(pb.StatSnapshotRequest(key=k("A"))).info
    b = s.Stat(pb.StatSnapshotRequest(key=k("b"))).info
    assert (a.name, a.kind, a.parent, dict(a.labels)) == (k("A"), pb.COMMITTED, "", {"c": "2"})
    assert (b.name, b.kind, b.parent) == (k("b"), pb.ACTIVE, k("A"))
    assert a.created_at.seconds > 1_600_000_000 and a.updated_at == a.created_at
    req = pb.UpdateSnapshotRequest(info=pb.Info(name=k("A"), labels={"c": "", "n": "3"}))
    req.update_mask.paths.extend(["labels.c", "labels.n"])
    got = s.Update(req).info
    assert dict(got.labels) == {"n": "3"}
    assert (got.updated_at.seconds, got.updated_at.nanos) > (
        a.updated_at.seconds,
        a.updated_at.nanos,
    )


def ns(name: str | None) -> tuple[tuple[str, str], ...]:
    return () if name is None else (("containerd-namespace", name),)


@pytest.mark.parametrize(
    ("first", "then"), [("k8s.io", None), (None, "k8s.io"), ("k8s.io", "default")]
)
def test_namespace_metadata_never_splits_keys(rpc, first, then):
    """What one request made, a request with other (or no) ``containerd-namespace``
    metadata finds: as parent, by Stat, Mounts, Update, Usage, List, Commit and Remove."""
    s, k = rpc
    s.Prepare(pb.PrepareSnapshotRequest(key=k("a"), labels={"l": "1"}), metadata=ns(first))
    s.Commit(pb.CommitSnapshotRequest(key=k("a"), name=k("A")), metadata=ns(first))
    s.View(pb.ViewSnapshotRequest(key=k("v"), parent=k("A")), metadata=ns(then))
    assert s.Stat(pb.StatSnapshotRequest(key=k("A")), metadata=ns(then)).info.name == k("A")
    s.Mounts(pb.MountsRequest(key=k("v")), metadata=ns(first))
    s.Usage(pb.UsageRequest(key=k("A")), metadata=ns(then))
    upd = pb.UpdateSnapshotRequest(info=pb.Info(name=k("A"), labels={"x": "y"}))
    s.Update(upd, metadata=ns(then))
    for md in (ns(first), ns(then), ns("elsewhere")):
        names = [
            i.name
            for b in s.List(pb.ListSnapshotsRequest(filters=mine(k)), metadata=md)
            for i in b.info
        ]
        assert names == [k("A"), k("v")]
    # One key space: the same key can't be made again under another namespace.
    s.Prepare(pb.PrepareSnapshotRequest(key=k("a2")), metadata=ns(first))
    code, details = code_and_details(
        s.Prepare, pb.PrepareSnapshotRequest(key=k("a2")), metadata=ns(then)
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS, details
    code, details = code_and_details(
        s.Commit, pb.CommitSnapshotRequest(key=k("a2"), name=k("A")), metadata=ns(then)
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS, details
    s.Remove(pb.RemoveSnapshotRequest(key=k("v")), metadata=ns(then))
    s.Remove(pb.RemoveSnapshotRequest(key=k("A")), metadata=ns(then))
    s.Remove(pb.RemoveSnapshotRequest(key=k("a2")), metadata=ns(then))
    assert list(s.List(pb.ListSnapshotsRequest(filters=mine(k)))) == []


def test_many_concurrent_calls(rpc):
    s, k = rpc

    def layer(i: int) -> str:
        s.Prepare(pb.PrepareSnapshotRequest(key=k(f"k{i}")))
        s.Commit(pb.CommitSnapshotRequest(key=k(f"k{i}"), name=k(f"n{i}")))
        m = s.Prepare(pb.PrepareSnapshotRequest(key=k(f"c{i}"), parent=k(f"n{i}")))
        return m.mounts[0].type

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(layer, range(64))) == ["overlay"] * 64
    infos = [i for b in s.List(pb.ListSnapshotsRequest(filters=mine(k))) for i in b.info]
    assert len(infos) == 128
