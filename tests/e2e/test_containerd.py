"""End to end: a real containerd 1.6 + runc pulls from a real registry through our daemon."""

from __future__ import annotations

import json
import os
import random
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from harness import Containerd, Registry, StargzDaemon, mounted_image, run, tree_listing
from harness.oci import build_image, find_manifest

from stargz.service.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SNAP = ("--snapshotter", "stargz")


def pull(c: Containerd, ref: str, ns: str = "e2e", **kw):
    return c.ctr("images", "pull", "--plain-http", *SNAP, ref, ns=ns, **kw)


def daemon_snapshots(sd: StargzDaemon) -> list[pb.Info]:
    """Every snapshot the daemon holds (one key space, whatever the namespace)."""
    with sd.channel() as ch:
        return [i for r in sd.stub(ch).List(pb.ListSnapshotsRequest(), timeout=30) for i in r.info]


def daemon_cleanup(sd: StargzDaemon) -> None:
    with sd.channel() as ch:
        sd.stub(ch).Cleanup(pb.CleanupRequest(), timeout=60)


def assert_no_orphans(sd: StargzDaemon, timeout: float = 10) -> None:
    """Cleanup leaves exactly one directory per snapshot the daemon knows.

    containerd's garbage collector may be removing snapshots meanwhile (a removed row's
    directory is deleted just after its transaction), so this waits for a quiet moment.
    """
    deadline = time.monotonic() + timeout
    while True:
        daemon_cleanup(sd)
        dirs, snaps = sd.snapshot_dirs(), daemon_snapshots(sd)
        if len(dirs) == len(snaps) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(dirs) == len(snaps), (dirs, [s.name for s in snaps])


def assert_quiet_log(sd: StargzDaemon) -> None:
    bad = [r for r in sd.log_records() if r["level"] in ("warning", "error", "fatal")]
    assert not bad, bad


def ctr_snapshot_keys(c: Containerd, ns: str) -> list[str]:
    out = c.ctr("snapshots", *SNAP, "ls", ns=ns).stdout.splitlines()[1:]
    return [line.split()[0] for line in out if line.strip()]


def test_pulled_image_mounts_to_the_ground_truth_tree(registry, containerd, stargz_daemon, shared):
    ref = registry.push_oci(shared / "fixtures" / "oci-corners", "orig", "corners:orig")
    pull(containerd, ref)
    with mounted_image(containerd, ref, "e2e") as root:
        got = tree_listing(root)
    want = json.loads((shared / "fixtures" / "oci-corners.merged-tree.json").read_text())
    assert got == want
    assert len(ctr_snapshot_keys(containerd, "e2e")) == 2
    assert_quiet_log(stargz_daemon)


@pytest.mark.interop
def test_rpull_asks_for_remote_snapshots_and_falls_back(
    registry, containerd, stargz_daemon, shared
):
    """``ctr-remote i rpull`` (Go) sends the remote-snapshot labels; with no lazy
    filesystem (--no-lazy) the daemon answers with normal mounts and containerd unpacks."""
    ref = registry.push_oci(shared / "fixtures" / "oci-corners", "esgz", "corners:esgz")
    run(
        [
            "ctr-remote",
            "-a",
            containerd.address,
            "-n",
            "e2e",
            "images",
            "rpull",
            "--plain-http",
            ref,
        ]
    )
    prepares = [r for r in stargz_daemon.log_records() if r.get("method") == "Prepare"]
    assert len(prepares) == 2
    for r in prepares:
        assert {"containerd.io/snapshot.ref", "containerd.io/snapshot/stargz/toc.digest"} <= set(
            r["labels"]
        )
    prepared = [r for r in stargz_daemon.log_records() if "remote-snapshot-prepared" in r]
    assert [r["remote-snapshot-prepared"] for r in prepared] == ["false", "false"]
    with mounted_image(containerd, ref, "e2e") as root:
        got = tree_listing(root)
    want = json.loads((shared / "fixtures" / "oci-corners.merged-tree.json").read_text())
    # Unpacked as a plain tar, an eStargz layer also shows the format's own entries.
    extra = set(got["entries"]) - set(want["entries"])
    assert extra == {".no.prefetch.landmark", "stargz.index.json"}
    for name in extra:
        del got["entries"][name]
    assert got == want
    assert_quiet_log(stargz_daemon)


def test_run_busybox_prints_its_output(registry, containerd, stargz_daemon, shared):
    ref = registry.push_oci(shared / "fixtures" / "oci-busybox", "1", "busybox:1")
    pull(containerd, ref)
    out = containerd.ctr(
        "run",
        "--rm",
        *SNAP,
        ref,
        "bb1",
        "sh",
        "-c",
        "cat /etc/greeting; echo written > /tmp/f; cat /tmp/f; ls /bin",
        ns="e2e",
    ).stdout
    lines = out.split()
    assert lines[:2] == ["hi", "written"], out
    assert sorted(lines[2:]) == busybox_bin(shared)
    assert_quiet_log(stargz_daemon)


def busybox_bin(shared: Path) -> list[str]:
    """Names under /bin in the busybox fixture's layer."""
    layout = shared / "fixtures" / "oci-busybox"
    (layer,) = find_manifest(layout, "1")["layers"]
    blob = layout / "blobs" / "sha256" / layer["digest"].split(":")[1]
    with tarfile.open(blob) as tar:
        names = [m.name.removeprefix("./") for m in tar.getmembers()]
    return sorted(n[4:] for n in names if n.startswith("bin/") and n != "bin/")


def test_every_rpc_through_ctr(registry, containerd, stargz_daemon, shared):
    ref = registry.push_oci(shared / "fixtures" / "oci-busybox", "1", "busybox:1")
    pull(containerd, ref)
    ns = "e2e"
    (layer,) = ctr_snapshot_keys(containerd, ns)
    c = containerd
    c.ctr("snapshots", *SNAP, "prepare", "work", layer, ns=ns)
    c.ctr("snapshots", *SNAP, "view", "look", layer, ns=ns)
    mounts = c.ctr("snapshots", *SNAP, "mounts", "/mnt", "work", ns=ns).stdout
    assert "overlay" in mounts and "upperdir=" in mounts and "lowerdir=" in mounts
    c.ctr("snapshots", *SNAP, "commit", "done", "work", ns=ns)
    c.ctr("snapshots", *SNAP, "label", "done", "team=storage", ns=ns)
    info = json.loads(c.ctr("snapshots", *SNAP, "info", "done", ns=ns).stdout)
    assert info["Kind"] == "Committed" and info["Parent"] == layer
    assert info["Labels"]["team"] == "storage"
    (row,) = c.ctr("snapshots", *SNAP, "usage", layer, ns=ns).stdout.splitlines()[1:]
    key, size, unit, inodes = row.split()
    assert key == layer and float(size) > 0 and unit in ("KiB", "MiB") and int(inodes) > 10
    tree = c.ctr("snapshots", *SNAP, "tree", ns=ns).stdout
    assert "done" in tree and "look" in tree
    c.ctr("snapshots", *SNAP, "rm", "look", "done", ns=ns)
    assert sorted(ctr_snapshot_keys(c, ns)) == [layer]
    # containerd removes from the snapshotter in its garbage collection, which a
    # synchronous image removal runs.
    c.ctr("images", "rm", "--sync", ref, ns=ns)
    assert ctr_snapshot_keys(c, ns) == [] and daemon_snapshots(stargz_daemon) == []
    # All ten methods, called by containerd (Remove and Cleanup by its GC).
    methods = {r.get("method") for r in stargz_daemon.log_records() if r["msg"] == "rpc"}
    assert methods == {
        "Prepare",
        "View",
        "Mounts",
        "Commit",
        "Update",
        "Stat",
        "List",
        "Usage",
        "Remove",
        "Cleanup",
    }
    assert_no_orphans(stargz_daemon)
    assert stargz_daemon.snapshot_dirs() == set()
    assert_quiet_log(stargz_daemon)


def wait_for_reconnect(c: Containerd, ns: str, timeout: float = 15) -> None:
    """containerd redials a restarted proxy plugin with backoff (at most 3 s apart in 1.6);
    until then its calls fail with UNAVAILABLE. Probe with a call that reaches the daemon."""
    deadline = time.monotonic() + timeout
    while c.ctr("snapshots", *SNAP, "prepare", "reconnect-probe", ns=ns, check=False).returncode:
        assert time.monotonic() < deadline, "containerd did not reconnect to the daemon"
        time.sleep(0.2)
    c.ctr("snapshots", *SNAP, "rm", "reconnect-probe", ns=ns)


def big_image(workdir: Path, layers: int = 4, mib: int = 16) -> Path:
    rnd = random.Random(1)
    files = [
        {f"layer{i}/blob{j}": rnd.randbytes(1 << 20) for j in range(mib)} for i in range(layers)
    ]
    return build_image(workdir / "big", "1", files, base=None, level=1)


def test_kill9_mid_unpack_then_restart_is_consistent(registry, containerd, stargz_daemon, shared):
    c, sd, ns = containerd, stargz_daemon, "crash"
    ref = registry.push_oci(big_image(sd.workdir), "1", "big:1")
    puller = c.ctr_async("images", "pull", "--plain-http", *SNAP, ref, ns=ns)
    try:
        # Wait until containerd has prepared the 2nd layer (so it is unpacking into it),
        # then kill the daemon.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            prepares = [
                r
                for r in sd.log_records()
                if r.get("method") == "Prepare" and "extract-" in r.get("key", "")
            ]
            if len(prepares) >= 2 or puller.poll() is not None:
                break
            time.sleep(0.005)
        assert len(prepares) >= 2, sd.log_text()[-3000:]
        sd.kill9()
        _, err = puller.communicate(timeout=120)
    finally:
        if puller.poll() is None:
            puller.kill()
            puller.communicate()
    assert puller.returncode != 0, "the pull finished before the daemon was killed"

    sd.restart()
    wait_for_reconnect(c, ns)
    # containerd's view is consistent: it can list, and stat every snapshot it knows.
    for key in ctr_snapshot_keys(c, ns):
        c.ctr("snapshots", *SNAP, "info", key, ns=ns)
    assert_no_orphans(sd)

    # A new pull and run succeed, and the interrupted image now pulls completely.
    bb = registry.push_oci(shared / "fixtures" / "oci-busybox", "1", "busybox:1")
    pull(c, bb, ns=ns)
    out = c.ctr("run", "--rm", *SNAP, bb, "after-crash", "cat", "/etc/greeting", ns=ns).stdout
    assert out == "hi\n"
    pull(c, ref, ns=ns)
    with mounted_image(c, ref, ns) as root:
        assert len(os.listdir(root / "layer3")) == 16

    # Remove every image, let containerd's GC run, then Cleanup: nothing is left behind.
    for lease in c.ctr("leases", "ls", "-q", ns=ns).stdout.split():
        c.ctr("leases", "rm", lease, ns=ns)  # what the 24 h expiry of a dead pull does
    for image in (ref, bb):
        c.ctr("images", "rm", "--sync", image, ns=ns)
    assert ctr_snapshot_keys(c, ns) == []
    assert daemon_snapshots(sd) == []
    daemon_cleanup(sd)
    assert sd.snapshot_dirs() == set()


def test_eight_parallel_pulls_of_different_images(registry, containerd, stargz_daemon, shared):
    busybox = shared / "fixtures" / "oci-busybox"
    layout = stargz_daemon.workdir / "par"
    refs = []
    for i in range(8):
        rnd = random.Random(i)
        extra = [
            {"id.txt": f"image {i}\n".encode(), "data/a": rnd.randbytes(256 << 10)},
            {f"data/{j}": rnd.randbytes(4096) for j in range(20)},
        ]
        build_image(layout, f"p{i}", extra, base=(busybox, "1"))
        refs.append(registry.push_oci(layout, f"p{i}", f"par{i}:1"))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda r: pull(containerd, r, check=False), refs))
    failed = [(r.args, r.stderr) for r in results if r.returncode != 0]
    assert not failed, failed

    for i, ref in enumerate(refs):
        out = containerd.ctr(
            "run",
            "--rm",
            *SNAP,
            ref,
            f"par{i}",
            "sh",
            "-c",
            "cat /id.txt; ls /data | wc -l",
            ns="e2e",
        ).stdout
        assert out.split() == ["image", str(i), "21"], out
    # 1 shared busybox layer + 2 distinct layers per image
    assert len(ctr_snapshot_keys(containerd, "e2e")) == 1 + 2 * 8
    assert_no_orphans(stargz_daemon)
    assert_quiet_log(stargz_daemon)


def test_same_image_through_overlayfs_and_stargz_gives_the_same_tree(
    registry: Registry, containerd: Containerd, shared: Path
):
    ref = registry.push_oci(shared / "fixtures" / "oci-corners", "orig", "corners:orig")
    trees = {}
    for snapshotter in ("overlayfs", "stargz"):
        containerd.ctr(
            "images", "pull", "--plain-http", "--snapshotter", snapshotter, ref, ns="cmp"
        )
        with mounted_image(containerd, ref, "cmp", snapshotter) as root:
            trees[snapshotter] = tree_listing(root)
    assert trees["overlayfs"] == trees["stargz"]
