"""Pods through containerd's CRI plugin on lazily pulled eStargz layers (real containerd
1.6, runc, docker-registry, our daemon), driven by the harness's CRI client as kubelet
drives a node.

containerd's CRI config is a node's: ``snapshotter = "stargz"``,
``disable_snapshot_annotations = false`` (the unpacker passes the layer annotations a lazy
pull needs), a ``registry.mirrors`` entry for the test registry, ``sandbox_image`` a local
image whose entrypoint blocks, ``restrict_oom_score_adj = true``. Pods use the host network
(``NamespaceOption.network = NODE``): no CNI plugin is installed on the test machines.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    Containerd,
    StargzDaemon,
    free_port,
    mounted_image,
    mounts_under,
    run,
    tree_listing,
)
from harness.cri import CRIClient, read_cri_log
from harness.fixtures import _show_log
from harness.oci import stack_images
from harness.procs import http_get

from .test_lazy import (
    NO_BACKGROUND,
    ground_truth,
    layers_of,
    prepared_flags,
    tar_files,
)

pytestmark = [pytest.mark.e2e, pytest.mark.interop, pytest.mark.timeout(300)]

NS = "k8s.io"
#: Files of the corners layers the pod's workload reads (a large multi-chunk one, a
#: hardlink, a file under a uid-1000 0750 dir).
READ = ("data/noise.bin", "data/text.txt", "data/hardlink-2")


@contextlib.contextmanager
def node(
    registry, shared: Path, config_text: str = NO_BACKGROUND, *, pods: bool = True
) -> Iterator[tuple[StargzDaemon, Containerd]]:
    """Our daemon under a containerd with CRI on (its pause image imported for ``pods``);
    both stopped, with their logs shown, at the end."""
    sd = StargzDaemon.start(config_text=config_text)
    c = None
    try:
        c = Containerd.start(sd.address, cri_registry=registry.host)
        if pods:
            c.import_sandbox_image(shared)
        yield sd, c
    finally:
        if c is not None:
            c.close()
            _show_log(c, 40)
        sd.close()
        _show_log(sd)


@pytest.fixture
def cri_node(e2e_host, registry, shared) -> Iterator[tuple[StargzDaemon, Containerd]]:
    """Our daemon (lazy, no background fetch: every byte a container reads comes from an
    on-demand fetch) under a containerd with CRI on, its pause image imported."""
    with node(registry, shared) as stack:
        yield stack


def stack_ref(registry, shared: Path, workdir: Path, name: str) -> tuple[str, list[dict]]:
    """busybox ``opt`` + ``oci-corners:esgz`` (three eStargz layers) pushed as ``name``."""
    fixtures = shared / "fixtures"
    layout = stack_images(
        workdir / "stack",
        "1",
        [(fixtures / "oci-busybox", "opt"), (fixtures / "oci-corners", "esgz")],
    )
    return registry.push_oci(layout, "1", name), layers_of(layout, "1")


def workload(shared: Path) -> tuple[list[str], str]:
    """The container's command, and what it must print: the sha256 of busybox itself
    (bottom layer, as the fixture's tar holds it), then of each file in :data:`READ`
    (corners layers, on top) as the ground truth has them."""
    entries = ground_truth(shared)["entries"]
    busybox = hashlib.sha256(tar_files(shared, "oci-busybox", "1")["bin/busybox"]).hexdigest()
    sums = [(busybox, "bin/busybox")] + [(entries[p]["sha256"], p) for p in READ]
    files = " ".join(f"/{p}" for _, p in sums)
    expected = "".join(f"{h}  /{p}\n" for h, p in sums)
    return ["sh", "-c", f"sha256sum {files}"], expected


def assert_remote(sd: StargzDaemon, c: Containerd, layers: list[dict]) -> None:
    """Every layer is a FUSE-mounted remote snapshot and no layer blob is in containerd's
    content store (a CRI pull fetches only what it unpacks; a remote layer isn't)."""
    assert prepared_flags(sd) == ["true"] * len(layers), sd.log_text()[-4000:]
    mounts = mounts_under(Path(sd.root) / "snapshots")
    assert sorted(m.root for m in mounts.values()) == sorted(
        "/" + d["digest"].split(":")[1] for d in layers
    )
    assert {m.fstype for m in mounts.values()} == {"fuse.stargz"}
    content = set(c.ctr("content", "ls", "-q", ns=NS).stdout.split())
    assert content and not content & {d["digest"] for d in layers}, content


@contextlib.contextmanager
def pod(cri: CRIClient, name: str, log_dir: Path) -> Iterator[tuple[str, object]]:
    """A running pod sandbox; stopped and removed, with its containers, on exit."""
    config = cri.pod_config(name, log_dir)
    pod_id = cri.run_pod(config)
    try:
        yield pod_id, config
    finally:
        cri.remove_pod(pod_id)


def run_workload(cri: CRIClient, ref: str, shared: Path, log_dir: Path, name: str) -> None:
    """A pod whose container runs :func:`workload` from ``ref``: it exits 0 and its CRI
    log holds exactly the expected output."""
    argv, expected = workload(shared)
    with pod(cri, name, log_dir) as (pod_id, config):
        cid = cri.create_container(pod_id, config, "reader", ref, argv)
        cri.start_container(cid)
        status = cri.wait_exited(cid)
        log = log_dir / "reader.log"
        assert status.exit_code == 0, (status, read_cri_log(log))
        assert status.log_path == str(log)
        assert read_cri_log(log) == expected
    assert not cri.list_pods()  # cleaned up


def test_cri_pull_and_pod_run_on_lazily_mounted_layers(cri_node, registry, shared):
    """CRI ``PullImage`` of an eStargz image makes every layer a FUSE-mounted remote
    snapshot (no layer blob in containerd's content store); ``RunPodSandbox`` +
    ``CreateContainer`` + ``StartContainer`` run a container on those layers that prints
    the sha256 of busybox (bottom layer) and of large, multi-chunk corner files, equal to the ground
    truth (every byte read on demand: background fetch is off); the pod and its container
    are removed at the end."""
    sd, c = cri_node
    ref, layers = stack_ref(registry, shared, sd.workdir, "cri-stack:pod")
    with CRIClient(c.address) as cri:
        image_id = cri.pull(ref)
        assert image_id.startswith("sha256:")
        assert_remote(sd, c, layers)
        status = cri.image_status(ref)
        assert status is not None and status.id == image_id and ref in status.repo_tags
        run_workload(cri, ref, shared, sd.workdir / "pod-logs", f"reader-{os.getpid()}")
    # nothing was unpacked: still only the remote mounts of the three layers
    assert prepared_flags(sd) == ["true"] * len(layers)


def test_cri_pulled_corners_tree_equals_the_ground_truth(cri_node, registry, shared):
    """The merged rootfs of the two-layer ``oci-corners:esgz`` image, CRI-pulled (so both
    layers are remote snapshots), read entirely through FUSE, equals the overlayfs ground
    truth exactly (modes, owners, sizes, hashes, links, devices, xattrs, whiteouts)."""
    sd, c = cri_node
    layout = shared / "fixtures" / "oci-corners"
    layers = layers_of(layout, "esgz")
    ref = registry.push_oci(layout, "esgz", "cri-corners:esgz")
    with CRIClient(c.address) as cri:
        cri.pull(ref)
    assert_remote(sd, c, layers)
    with mounted_image(c, ref, NS) as root:
        assert tree_listing(root) == ground_truth(shared)


def test_cri_pull_of_an_image_that_is_not_estargz_is_unpacked_and_counted(
    e2e_host, registry, shared
):
    """A CRI ``PullImage`` of plain ``tar+gzip`` layers: containerd unpacks them (their
    blobs are in its content store, no FUSE mount), the reason is logged per layer, shown
    by ``stargz status`` and counted in Prometheus by reason; the image's tree equals the
    ground truth, as containerd's own unpack gives it."""
    port = free_port()
    config = f'{NO_BACKGROUND}metrics_address = "127.0.0.1:{port}"\n'
    with node(registry, shared, config, pods=False) as (sd, c):
        layout = shared / "fixtures" / "oci-corners"
        layers = layers_of(layout, "orig")
        ref = registry.push_oci(layout, "orig", "cri-plain:orig")
        with CRIClient(c.address) as cri:
            cri.pull(ref)
        assert prepared_flags(sd) == ["false"] * len(layers)
        assert not mounts_under(Path(sd.root) / "snapshots")
        content = set(c.ctr("content", "ls", "-q", ns=NS).stdout.split())
        assert {d["digest"] for d in layers} <= content
        status = json.loads(run(["stargz", "status", "--address", sd.address, "--json"]).stdout)
        reasons = [r["reason"] for r in status["refused"]]
        assert reasons == ["no-toc-digest"] * len(layers), status["refused"]
        metrics = http_get(f"http://127.0.0.1:{port}/metrics").decode()
        want = f'stargz_snapshot_remote_refusals_total{{reason="no-toc-digest"}} {len(layers)}.0'
        assert want in metrics.splitlines(), [m for m in metrics.splitlines() if "refusal" in m]
        with mounted_image(c, ref, NS) as root:
            assert tree_listing(root) == ground_truth(shared)
