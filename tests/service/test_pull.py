"""``stargz.v1.Pull`` asked directly over the daemon's socket (a real daemon), with requests
the ``stargz rpull`` command never sends: each bad field is INVALID_ARGUMENT naming it,
before containerd or a registry is asked. The pulls themselves are end-to-end tests
(tests/e2e/test_rpull.py, tests/e2e/test_rpull_daemon.py)."""

from __future__ import annotations

import grpc
import pytest

from stargz.service.proto.stargz.v1 import pull_pb2 as pb
from stargz.service.proto.stargz.v1 import pull_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.timeout(120)]


@pytest.mark.parametrize(
    ("fields", "want"),
    [
        ({"ref": ""}, "no image reference"),
        ({"containerd_address": "run/containerd.sock"}, "is not an absolute path"),
        ({"containerd_address": ""}, "is not an absolute path"),
        ({"password": "s3cret"}, "a registry password without a user name"),
        ({"platform": "linux"}, "want os/arch"),
        ({"ref": "reg:5000/Upper:1"}, "must be lowercase"),
    ],
)
def test_bad_requests_are_invalid_argument(snapshot_daemon, tmp_path, fields, want):
    request = {
        "ref": "127.0.0.1:5000/app:1",
        "containerd_address": str(tmp_path / "containerd.sock"),
        "namespace": "pull",
        **fields,
    }
    with snapshot_daemon.channel() as ch:
        with pytest.raises(grpc.RpcError) as info:
            list(pb_grpc.PullStub(ch).Pull(pb.PullRequest(**request), timeout=30))
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert want in err.details() and "\n" not in err.details(), err.details()


def test_no_containerd_is_unavailable_naming_it(snapshot_daemon, tmp_path):
    """A containerd socket that is not there: UNAVAILABLE, the socket named."""
    gone = tmp_path / "containerd.sock"
    request = pb.PullRequest(ref="127.0.0.1:5000/app:1", containerd_address=str(gone))
    with snapshot_daemon.channel() as ch:
        with pytest.raises(grpc.RpcError) as info:
            list(pb_grpc.PullStub(ch).Pull(request, timeout=30))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"cannot reach containerd at {gone}: no such socket" in info.value.details()
