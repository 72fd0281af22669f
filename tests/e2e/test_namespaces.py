"""Lazily pulled images across containerd namespaces and clients, with real containerd 1.6.

containerd passes the ``containerd-namespace`` gRPC metadata to a proxy snapshotter only
from its in-process callers (the CRI plugin); requests that come in over containerd's API
(``ctr``, ``ctr-remote``, nerdctl) reach the snapshotter without it. Remote snapshots are
committed under their chain ID, which containerd does not prefix with a namespace, so the
daemon must find them whatever metadata the next request carries.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Containerd, StargzDaemon, image_chain_id, mounted_image, mounts_under, run
from harness.fixtures import _show_log

from stargz.service.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from stargz.snapshot.types import REMOTE_LABEL, REMOTE_LABEL_VALUE

from .test_lazy import (
    BUSYBOX_WORKLOAD,
    busybox_expected_output,
    daemon_list,
    prepared_flags,
    tar_files,
)

pytestmark = [pytest.mark.e2e, pytest.mark.interop, pytest.mark.timeout(240)]

SNAP = ("--snapshotter", "stargz")


@pytest.fixture
def cri_stack(e2e_host, registry) -> Iterator[tuple[StargzDaemon, Containerd]]:
    """Our daemon (lazy, no background fetch) under a containerd whose CRI plugin is on."""
    sd = StargzDaemon.start(config_text="no_background_fetch = true\n")
    c = None
    try:
        c = Containerd.start(sd.address, cri_registry=registry.host)
        yield sd, c
    finally:
        if c is not None:
            c.close()
            _show_log(c, 30)
        sd.close()
        _show_log(sd)


def rpull(c: Containerd, ref: str, ns: str, client: str = "ctr-remote") -> None:
    """A lazy pull by Go's ``ctr-remote i rpull`` or by our ``stargz rpull``."""
    if client == "ctr-remote":
        run(["ctr-remote", "-a", c.address, "-n", ns, "images", "rpull", "--plain-http", ref])
    else:
        run(
            [sys.executable, "-m", "stargz.cli.main", "rpull", "-q", "-a", c.address, "-n", ns, ref]
        )


def snapshot_labels(c: Containerd, name: str, ns: str) -> dict[str, str]:
    """The labels containerd reports for snapshot ``name`` in namespace ``ns``."""
    return json.loads(c.ctr("snapshots", *SNAP, "info", name, ns=ns).stdout)["Labels"]


def daemon_rpcs(sd: StargzDaemon, method: str) -> list[str | None]:
    """The ``containerd-namespace`` each ``method`` call carried, in order."""
    return [
        r.get("namespace")
        for r in sd.log_records()
        if r.get("msg") == "rpc" and r.get("method") == method
    ]


def assert_reads_lazily(c: Containerd, ref: str, ns: str, shared: Path) -> None:
    """``ctr -n NS snapshots view`` of the image's chain ID mounts, and the rootfs it gives
    is our FUSE filesystem (the remote snapshot's ``fs`` dir, bind-mounted) with the
    image's bytes; ``ctr -n NS run`` of the image runs the busybox workload on it."""
    chain = image_chain_id(c, ref, ns)
    assert snapshot_labels(c, chain, ns).get(REMOTE_LABEL) == REMOTE_LABEL_VALUE
    greeting = tar_files(shared, "oci-busybox", "1")["etc/greeting"]
    with mounted_image(c, ref, ns) as root:
        assert {m.fstype for m in mounts_under(root).values()} == {"fuse.stargz"}
        assert (root / "etc" / "greeting").read_bytes() == greeting
    name = f"ns-{ns.replace('.', '-')}-{os.getpid()}"
    out = c.ctr("run", "--rm", *SNAP, ref, name, *BUSYBOX_WORKLOAD, ns=ns).stdout
    assert out == busybox_expected_output(shared)


def assert_one_remote_snapshot_and_nothing_else(sd: StargzDaemon) -> None:
    """The second namespace's pull found the layer: its unpack left no active snapshot
    and no second FUSE mount of it behind (containers' snapshots wait for containerd's GC)."""
    infos = daemon_list(sd)
    assert [i.name for i in infos if i.kind == pb.ACTIVE and "/extract-" in i.name] == []
    # one FUSE session at <root>/fuse, and one bind of it per mounted layer
    layers = [m for m in mounts_under(sd.root).values() if m.fstype == "fuse.stargz"]
    assert len([m for m in layers if m.root != "/"]) == 1, layers


def test_cri_pull_then_ctr_view_and_run_in_k8s_io_and_a_pull_in_default(
    registry, cri_stack, shared
):
    """The reported sequence: CRI ``PullImage`` (in-process, so its requests carry
    ``containerd-namespace: k8s.io``) lazily pulls an eStargz image; then
    ``ctr -n k8s.io snapshots view`` and ``ctr -n k8s.io run`` of it (requests without
    metadata) work on the lazily mounted layer; then ``ctr-remote -n default i rpull`` of
    the same image finds that remote snapshot, and view and run work in ``default`` too."""
    sd, c = cri_stack
    ref = registry.push_oci(shared / "fixtures" / "oci-busybox", "esgz", "busybox:ns-cri")
    c.cri_pull(ref)
    assert prepared_flags(sd) == ["true"]  # the one layer became a remote snapshot
    assert set(daemon_rpcs(sd, "Prepare")) == {"k8s.io"}
    assert_reads_lazily(c, ref, "k8s.io", shared)
    assert None in daemon_rpcs(sd, "View")  # ctr's view came without metadata

    rpull(c, ref, "default")
    assert_reads_lazily(c, ref, "default", shared)
    chain = image_chain_id(c, ref, "default")
    committed = [i for i in daemon_list(sd) if i.kind == pb.COMMITTED and i.name == chain]
    assert len(committed) == 1  # both namespaces stand on the same remote snapshot
    assert_one_remote_snapshot_and_nothing_else(sd)


@pytest.mark.parametrize("client", ["ctr-remote", "stargz"])
def test_rpull_in_k8s_io_then_view_and_run_and_a_pull_in_default(
    lazy_stack, registry, shared, client
):
    """``ctr-remote -n k8s.io i rpull`` (the Go client that sets the remote-snapshot labels)
    or our ``stargz rpull`` lazily pulls; ``ctr -n k8s.io snapshots view`` and ``ctr -n
    k8s.io run`` work on the lazily mounted layer; the same image rpulled in ``default``
    (by the same client) works too."""
    sd, c = lazy_stack("no_background_fetch = true\n")
    ref = registry.push_oci(shared / "fixtures" / "oci-busybox", "esgz", f"busybox:ns-{client}")
    rpull(c, ref, "k8s.io", client)
    assert prepared_flags(sd) == ["true"]
    assert_reads_lazily(c, ref, "k8s.io", shared)
    rpull(c, ref, "default", client)
    assert_reads_lazily(c, ref, "default", shared)
    assert_one_remote_snapshot_and_nothing_else(sd)
