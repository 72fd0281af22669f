"""One key space, whatever ``containerd-namespace`` metadata a request carries.

containerd sends that metadata to a proxy snapshotter on some paths only: its CRI plugin's
in-process calls carry it, requests that reach containerd over its API (``ctr``, nerdctl)
do not. A remote snapshot committed by one must be a parent for the other. These tests
drive the real daemon (lazy pulling on) over gRPC, with a real registry serving the
Go-made ``oci-corners:esgz`` image, and send what containerd's unpacker sends.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness.oci import find_manifest
from harness.procs import Registry, StargzDaemon, make_tempdir, run, shared_dir, unmount_under

from stargz.service.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from stargz.snapshot.types import REMOTE_LABEL, TARGET_SNAPSHOT_LABEL

from .conftest import SCHEMA_1

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

K8S = (("containerd-namespace", "k8s.io"),)
NONE: tuple[tuple[str, str], ...] = ()
TAG = "esgz"


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    if os.geteuid() != 0:
        pytest.skip("needs root (FUSE and overlay mounts)")
    reg = Registry.start()
    try:
        yield reg
    finally:
        reg.close()


@pytest.fixture
def lazy_daemon() -> Iterator[StargzDaemon]:
    d = StargzDaemon.start(config_text="no_background_fetch = true\n")
    try:
        yield d
    finally:
        d.close()


def layout() -> Path:
    return shared_dir() / "fixtures" / "oci-corners"


def _blob(digest: str) -> bytes:
    return (layout() / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()


def image_layers(ref: str) -> list[tuple[str, dict[str, str]]]:
    """(chain ID, Prepare labels) per layer, base first, as containerd's unpacker (driven by
    ``ctr-remote i rpull``) sends them."""
    manifest: Any = find_manifest(layout(), TAG)
    diff_ids = json.loads(_blob(manifest["config"]["digest"]))["rootfs"]["diff_ids"]
    digests = [d["digest"] for d in manifest["layers"]]
    out, chain = [], ""
    for desc, diff_id in zip(manifest["layers"], diff_ids, strict=True):
        chain = (
            diff_id
            if not chain
            else "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
        )
        labels = {
            TARGET_SNAPSHOT_LABEL: chain,
            "containerd.io/snapshot/remote/stargz.reference": ref,
            "containerd.io/snapshot/remote/stargz.digest": desc["digest"],
            "containerd.io/snapshot/remote/stargz.layers": ",".join(digests),
            "containerd.io/snapshot/stargz/toc.digest": desc["annotations"][
                "containerd.io/snapshot/stargz/toc.digest"
            ],
        }
        out.append((chain, labels))
    return out


def lazy_pull(stub: Any, ref: str, ns: str, md: tuple[tuple[str, str], ...]) -> str:
    """Each layer: Prepare with the target label, answered ALREADY_EXISTS because the daemon
    mounted the layer and committed it under its chain ID. Returns the top chain ID."""
    parent = ""
    for n, (chain, labels) in enumerate(image_layers(ref), 1):
        key = f"{ns}/{n}/extract-{n} {chain}"
        req = pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels)
        with pytest.raises(grpc.RpcError) as e:
            stub.Prepare(req, metadata=md, timeout=60)
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS, e.value.details()
        parent = chain
    return parent


def read_through(mounts: Any) -> dict[str, str]:
    """Mount what View answered, read-only; sha256 of a few files of the ground truth."""
    truth = json.loads((shared_dir() / "fixtures" / "oci-corners.merged-tree.json").read_text())
    files = sorted(p for p, e in truth["entries"].items() if e["type"] == 8 and e["size"] > 0)
    target = make_tempdir("sgz-ks-")
    try:
        for m in mounts:
            argv = ["mount"] if m.type == "bind" else ["mount", "-t", m.type]
            run([*argv, "-o", ",".join(m.options), m.source, str(target)])
        got = {p: hashlib.sha256((target / p).read_bytes()).hexdigest() for p in files[:20]}
        want = {p: truth["entries"][p]["sha256"] for p in files[:20]}
        assert got == want
        return got
    finally:
        unmount_under(target)
        target.rmdir()


@pytest.mark.parametrize(
    ("pull_md", "view_md"),
    [(K8S, NONE), (NONE, K8S)],
    ids=["cri-pull-then-ctr-view", "ctr-pull-then-cri-view"],
)
def test_remote_snapshot_is_a_parent_whatever_namespace_metadata(
    registry, lazy_daemon, pull_md, view_md
):
    """The reported sequence: a lazy pull with ``containerd-namespace: k8s.io`` (CRI), then
    ``ctr -n k8s.io snapshots view`` of the top chain ID, which reaches the daemon with no
    metadata; and the other way round. The view stands on the lazily mounted layers."""
    ref = registry.push_oci(layout(), TAG, "corners:esgz")
    d = lazy_daemon
    with d.channel() as ch:
        s = d.stub(ch)
        top = lazy_pull(s, ref, "k8s.io", pull_md)
        for chain, _ in image_layers(ref):
            info = s.Stat(pb.StatSnapshotRequest(key=chain), metadata=view_md, timeout=10).info
            assert info.kind == pb.COMMITTED and REMOTE_LABEL in info.labels
        view = pb.ViewSnapshotRequest(key="k8s.io/9/v", parent=top)
        mounts = s.View(view, metadata=view_md, timeout=30).mounts
        assert [m.type for m in mounts] == ["overlay"]
        read_through(mounts)
        # Every request sees the same snapshots, with or without metadata.
        lists = [
            sorted(i.name for r in s.List(pb.ListSnapshotsRequest(), metadata=md) for i in r.info)
            for md in (NONE, K8S, (("containerd-namespace", "default"),))
        ]
        assert lists[0] == lists[1] == lists[2] and "k8s.io/9/v" in lists[0]
        s.Remove(pb.RemoveSnapshotRequest(key="k8s.io/9/v"), metadata=pull_md, timeout=10)
    # The metadata was received (and logged), yet split nothing.
    sent = {
        (r["method"], r["namespace"])
        for r in d.log_records()
        if r.get("msg") == "rpc" and r.get("method") in ("Prepare", "View")
    }
    want_ns = {NONE: None, K8S: "k8s.io"}
    assert sent == {("Prepare", want_ns[pull_md]), ("View", want_ns[view_md])}


def test_second_namespace_reuses_the_remote_snapshots(registry, lazy_daemon):
    """The same image pulled in ``default`` after ``k8s.io``: containerd's unpacker sends the
    chain ID that already exists as the target, with the other namespace's metadata; the
    daemon answers ALREADY_EXISTS without committing a second copy, and a view in
    ``default`` reads through the same FUSE mounts."""
    ref = registry.push_oci(layout(), TAG, "corners:esgz")
    d = lazy_daemon
    with d.channel() as ch:
        s = d.stub(ch)
        top = lazy_pull(s, ref, "k8s.io", K8S)
        top2 = lazy_pull(s, ref, "default", (("containerd-namespace", "default"),))
        assert top2 == top
        chains = [c for c, _ in image_layers(ref)]
        names = sorted(i.name for r in s.List(pb.ListSnapshotsRequest()) for i in r.info)
        committed = [n for n in names if n in chains]
        assert committed == sorted(chains)  # one remote snapshot per layer, not two
        view = pb.ViewSnapshotRequest(key="default/9/v", parent=top)
        read_through(s.View(view, metadata=NONE, timeout=30).mounts)


def test_daemon_upgrades_a_schema_1_root_with_remote_snapshots(registry, tmp_path):
    """A root written by a daemon that split keys by namespace (schema 1: the same chain ID
    committed in ``k8s.io`` and ``default``) keeps working after the upgrade: one copy is
    kept, the other namespace's view stands on it, and it reads through FUSE."""
    ref = registry.push_oci(layout(), TAG, "corners:esgz")
    d = StargzDaemon.start(config_text="no_background_fetch = true\n")
    try:
        with d.channel() as ch:
            s = d.stub(ch)
            top = lazy_pull(s, ref, "k8s.io", K8S)
            s.Prepare(
                pb.PrepareSnapshotRequest(key="k8s.io/8/pod", parent=top), metadata=K8S, timeout=30
            )
        d.stop()
        db = Path(d.root) / "metadata.db"
        _downgrade_to_schema_1_with_a_second_namespace(db)
        d.restart()
        with d.channel() as ch:
            s = d.stub(ch)
            infos = {i.name: i for r in s.List(pb.ListSnapshotsRequest()) for i in r.info}
            assert set(infos) == {c for c, _ in image_layers(ref)} | {"k8s.io/8/pod", "view"}
            assert infos["view"].parent == top
            mounts = s.Mounts(pb.MountsRequest(key="view"), timeout=30).mounts
            read_through(mounts)
            s.Cleanup(pb.CleanupRequest(), timeout=30)
        # The dropped copies' directories were reclaimed.
        with sqlite3.connect(db) as c:
            ids = {str(i) for (i,) in c.execute("SELECT id FROM snapshots")}
        assert d.snapshot_dirs() == ids
        merged = [r for r in d.log_records() if r.get("kept_id")]
        assert len(merged) == 2 and all(r["level"] == "warning" for r in merged)
    finally:
        d.close()


def _downgrade_to_schema_1_with_a_second_namespace(db: Path) -> None:
    """Rewrite ``db`` as schema 1 did, adding a ``default`` copy of every committed chain
    (with a directory of its own, as schema 1 made) and a view on its top."""
    c = sqlite3.connect(db)
    rows = c.execute(
        "SELECT id, key, kind, parent_id, labels, created, updated, size, inodes FROM snapshots"
    ).fetchall()
    seq = c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'snapshots'").fetchone()[0]
    c.executescript("DROP TABLE snapshots;\n" + SCHEMA_1)
    insert = (
        "INSERT INTO snapshots (id, namespace, key, kind, parent_id, labels, created, updated, "
        "size, inodes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )
    copies: dict[int, int] = {}
    next_id = seq + 1
    for sid, key, kind, parent, *rest in sorted(rows):
        c.execute(insert, (sid, "k8s.io", key, kind, parent, *rest))
        if kind == pb.COMMITTED:
            copies[sid] = next_id
            c.execute(insert, (next_id, "default", key, kind, copies.get(parent), *rest))
            (db.parent / "snapshots" / str(next_id) / "fs").mkdir(parents=True)
            next_id += 1
    top = max(copies)
    c.execute(insert, (next_id, "default", "view", pb.VIEW, copies[top], "{}", 1, 1, 0, 0))
    (db.parent / "snapshots" / str(next_id) / "fs").mkdir(parents=True)
    c.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'snapshots'", (next_id,))
    c.execute("PRAGMA user_version = 1")
    c.commit()
    c.close()
