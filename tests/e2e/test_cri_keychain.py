"""The CRI keychain with real parts: a docker-registry with htpasswd basic auth, containerd
1.6 with CRI on and NO registry credentials in its config, and our daemon with
``[cri_keychain] enable_keychain = true`` serving the CRI ``ImageService`` in front of
containerd's.

The test's CRI client plays kubelet started with
``--image-service-endpoint=unix://<daemon socket>``: it sends ``PullImage`` with the pull
secret in ``auth`` to the daemon, which learns the credentials and forwards the call to
containerd. containerd fetches the manifest with the ``auth`` it is forwarded; the layers
are mounted lazily by the daemon, which can read them only because the keychain gave it
the credentials (a pull straight to containerd proves that: the daemon cannot mount, and
containerd unpacks). The credentials survive a daemon restart (kept 0600 under the root),
so an uncached file of a restored mount still reads. (Without the file, as with the Go
daemon's in-memory keychain, the restarted daemon cannot restore the snapshots: the
registry answers 401 and the start fails.)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from harness import Containerd, Registry, StargzDaemon, make_tempdir, mounted_image, mounts_under
from harness.cri import CRIClient, cri
from harness.fixtures import _show_log

from .test_cri import NS, assert_remote, run_workload, stack_ref
from .test_lazy import NO_BACKGROUND, ground_truth, layers_of, poll, prepared_flags

pytestmark = [pytest.mark.e2e, pytest.mark.interop, pytest.mark.timeout(300)]

USER = "kubelet-secret-user"
_API_LINE = re.compile(r'"(?:GET|HEAD) /v2/\S* HTTP/[0-9.]+" (\d{3}) ')
KEYCHAIN_FILE = "cri-keychain.json"


class Node:
    """A private registry, our daemon with the keychain on, containerd with CRI."""

    def __init__(self, reg: Registry, sd: StargzDaemon, c: Containerd, image_socket: str):
        self.reg, self.sd, self.c = reg, sd, c
        #: Where kubelet's ``--image-service-endpoint`` points.
        self.image_socket = image_socket
        self.password = reg.basic_auth[1]

    def auth(self) -> cri.AuthConfig:
        return cri.AuthConfig(username=USER, password=self.password)

    def keychain_file(self) -> Path:
        return Path(self.sd.root) / KEYCHAIN_FILE

    def assert_no_secret_logged(self) -> None:
        log = self.sd.log_text()
        assert self.password not in log
        assert secrets_b64(self.password) not in log


def secrets_b64(password: str) -> str:
    return base64.b64encode(f"{USER}:{password}".encode()).decode()


def statuses(reg: Registry) -> list[int]:
    """The status of every registry API request in the access log."""
    return [int(m[1]) for m in _API_LINE.finditer(reg.log_text())]


@pytest.fixture
def private_node(e2e_host, shared) -> Iterator[Callable[..., Node]]:
    started: list = []

    def start(*, own_socket: bool = False) -> Node:
        password = "pw-" + secrets.token_hex(12)
        reg = Registry.start(access_log=True, basic_auth=(USER, password))
        started.append(reg)
        cdir = make_tempdir("sgz-c-")  # containerd's socket goes in the daemon's config
        started.append(cdir)  # (removed by containerd's close, or here if it never started)
        listen = ""
        if own_socket:
            listen = str(make_tempdir("sgz-cri-") / "image.sock")
            started.append(Path(listen).parent)
        sd = StargzDaemon.start(
            config_text=(
                f"{NO_BACKGROUND}[fuse]\npassthrough = false\n"
                "[cri_keychain]\nenable_keychain = true\n"
                f'image_service_path = "{cdir}/containerd.sock"\nlisten_path = "{listen}"\n'
            )
        )
        started.append(sd)
        c = Containerd.start(sd.address, workdir=cdir, cri_registry=reg.host)
        started.append(c)
        c.import_sandbox_image(shared)
        return Node(reg, sd, c, listen or sd.address)

    try:
        yield start
    finally:
        with contextlib.ExitStack() as stack:
            for d in started:  # the last started stops first
                if isinstance(d, Path):
                    stack.callback(shutil.rmtree, d, ignore_errors=True)
                else:
                    stack.callback(_show_log, d, 40)
                    stack.callback(d.close)


def layer_bytes(reg: Registry, layers: list[dict]) -> int:
    return sum(reg.blob_bytes(d["digest"]) for d in layers)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_keychain_lets_the_daemon_mount_a_private_image_and_survives_a_restart(
    private_node, shared
):
    node = private_node()
    sd, c, reg = node.sd, node.c, node.reg
    entries = ground_truth(shared)["entries"]

    # control: the same kind of pull straight to containerd (auth reaches containerd only)
    # leaves the daemon without credentials: it cannot mount, containerd unpacks instead
    # (busybox ``esgz``: no layer in common with the image below)
    control = reg.push_oci(shared / "fixtures" / "oci-busybox", "esgz", "control:1")
    with CRIClient(c.address) as direct:
        direct.pull(control, auth=node.auth())
    assert prepared_flags(sd) == ["false"]
    assert not mounts_under(Path(sd.root) / "snapshots")

    # kubelet -> the daemon's image service: the daemon learns, then mounts lazily
    ref, layers = stack_ref(reg, shared, sd.workdir, "private:1")
    with CRIClient(node.image_socket) as kubelet:
        image_id = kubelet.pull(ref, auth=node.auth())
        status = kubelet.image_status(ref)
        assert status is not None and status.id == image_id
    flags = prepared_flags(sd)[1:]
    assert flags == ["true"] * 3, sd.log_text()[-3000:]
    content = set(c.ctr("content", "ls", "-q", ns=NS).stdout.split())
    assert not content & {d["digest"] for d in layers}
    mounted = {m.root for m in mounts_under(Path(sd.root) / "snapshots").values()}
    assert mounted == {"/" + d["digest"].split(":")[1] for d in layers}
    with mounted_image(c, ref, NS) as root:
        assert sha256_of(root / "data" / "text.txt") == entries["data/text.txt"]["sha256"]
    gets = [r for d in layers for r in reg.blob_requests(d["digest"]) if r.method == "GET"]
    assert gets and {r.status for r in gets} <= {206}, gets  # authenticated range reads
    assert 401 in statuses(reg)  # the registry does demand auth

    # the credentials file: root's, 0600, names the host; no secret in the daemon's log
    path = node.keychain_file()
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    assert reg.host in path.read_text()
    node.assert_no_secret_logged()

    # restart: the restored remote snapshots of the private image read an uncached 5 MB
    # file from the registry, in a pod's container kubelet-style
    before = layer_bytes(reg, layers)
    sd.restart()
    loaded = [r for r in sd.log_records() if r["msg"] == "CRI keychain loaded"]
    assert loaded and loaded[-1]["hosts"] == [reg.host]
    poll(
        "containerd to reconnect",
        lambda: (
            c.ctr("snapshots", "--snapshotter", "stargz", "ls", ns=NS, check=False).returncode == 0
        ),
        30,
    )
    with CRIClient(c.address) as runtime:
        run_workload(runtime, ref, shared, sd.workdir / "pod-logs", "private-reader")
    fetched = layer_bytes(reg, layers) - before
    assert fetched >= entries["data/noise.bin"]["size"], fetched  # really read after restart
    node.assert_no_secret_logged()
    assert not [r for r in sd.log_records() if r["level"] in ("error", "critical", "fatal")]


def test_image_service_forwards_errors_and_drops_credentials_with_the_last_image(
    private_node, shared
):
    """On its own socket (``listen_path``): a malformed ``auth`` is refused with
    ``INVALID_ARGUMENT`` naming the field (nothing forwarded, the daemon keeps serving); a
    tag that does not exist gets containerd's ``NOT_FOUND`` (and its credentials are not
    kept); the other calls answer as containerd's own; ``RemoveImage`` of the host's last
    image drops its credentials and the file."""
    node = private_node(own_socket=True)
    sd, c, reg = node.sd, node.c, node.reg
    assert node.image_socket != sd.address
    assert stat.S_IMODE(os.stat(node.image_socket).st_mode) == 0o600
    ref = reg.push_oci(shared / "fixtures" / "oci-corners", "esgz", "private:2")
    layers = layers_of(shared / "fixtures" / "oci-corners", "esgz")
    with CRIClient(node.image_socket) as kubelet, CRIClient(c.address) as direct:
        with pytest.raises(grpc.RpcError) as e:
            kubelet.pull(ref, auth=cri.AuthConfig(auth="%%% not base64"))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "auth.auth is not base64" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            kubelet.pull(ref, auth=cri.AuthConfig(auth=base64.b64encode(b"no-colon").decode()))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "user:password" in e.value.details()
        assert not prepared_flags(sd)  # nothing reached containerd

        with pytest.raises(grpc.RpcError) as e:
            kubelet.pull(reg.ref("private:no-such-tag"), auth=node.auth())
        assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()
        assert "no-such-tag" in e.value.details()
        assert not node.keychain_file().exists()

        image_id = kubelet.pull(ref, auth=node.auth())
        assert_remote(sd, c, layers)
        assert reg.host in node.keychain_file().read_text()
        ids = lambda client: sorted(i.id for i in client.list_images())  # noqa: E731
        assert ids(kubelet) == ids(direct) and image_id in ids(direct)
        mountpoints = lambda client: [  # noqa: E731
            f.fs_id.mountpoint for f in client.image_fs_info().image_filesystems
        ]
        assert mountpoints(kubelet) == mountpoints(direct) and mountpoints(direct)
        assert kubelet.image_status(reg.ref("private:absent")) is None

        kubelet.remove_image(ref)
        assert image_id not in ids(direct)
        assert len(ids(direct)) == 1  # the pause image (localhost/...) holds no credentials
        assert not node.keychain_file().exists()
    dropped = [r for r in sd.log_records() if r["msg"].startswith("registry credentials dropped")]
    assert dropped and dropped[-1]["hosts"] == [reg.host]
    node.assert_no_secret_logged()
    assert sd.alive()
