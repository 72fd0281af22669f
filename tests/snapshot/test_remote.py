"""The remote-snapshot branch of Prepare (SPEC §2, §7.3), through a fake FileSystem."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from stargz.errors import AlreadyExists, NotFound, Unavailable
from stargz.snapshot import (
    REMOTE_LABEL,
    REMOTE_LABEL_VALUE,
    REMOTE_SNAPSHOT_LOG_KEY,
    TARGET_SNAPSHOT_LABEL,
    FileSystem,
    Kind,
    Snapshotter,
)

from .conftest import FakeFS

CHAIN = "sha256:" + "ab" * 32
LAYER_LABELS = {
    TARGET_SNAPSHOT_LABEL: CHAIN,
    "containerd.io/snapshot/cri.layer-digest": "sha256:" + "cd" * 32,
    "containerd.io/snapshot/stargz/toc.digest": "sha256:" + "ef" * 32,
}


@pytest.fixture
def fakefs() -> FakeFS:
    return FakeFS()


@pytest.fixture
def sn(tmp_path, run, fakefs):
    s = run(Snapshotter.open(tmp_path / "root", fakefs))
    yield s
    run(s.close())


def prepared(caplog) -> list[str]:
    return [
        getattr(r, REMOTE_SNAPSHOT_LOG_KEY)
        for r in caplog.records
        if hasattr(r, REMOTE_SNAPSHOT_LOG_KEY)
    ]


def test_fake_fs_satisfies_the_protocol(fakefs):
    assert isinstance(fakefs, FileSystem)


def test_remote_prepare_commits_the_target_and_answers_already_exists(sn, run, fakefs, caplog):
    caplog.set_level(logging.DEBUG, "stargz.snapshot")
    with pytest.raises(AlreadyExists, match=f'target snapshot "{CHAIN}"'):
        run(sn.prepare("extract-1 " + CHAIN, "", LAYER_LABELS))
    info = run(sn.stat(CHAIN))
    assert info.kind == Kind.COMMITTED
    assert dict(info.labels) == {**LAYER_LABELS, REMOTE_LABEL: REMOTE_LABEL_VALUE}
    with pytest.raises(NotFound):
        run(sn.stat("extract-1 " + CHAIN))
    ((op, mountpoint),) = fakefs.calls
    assert op == "mount" and mountpoint.endswith("/fs")
    assert fakefs.labels[mountpoint] == LAYER_LABELS
    assert prepared(caplog) == ["true"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert run(sn.usage(CHAIN)).size == 0  # a lazy layer is not walked

    # The container's rootfs over the remote layer: Check is asked, then overlay mounts.
    (m,) = run(sn.prepare("container", CHAIN))
    assert m.type == "overlay" and f"lowerdir={mountpoint}" in m.options
    assert fakefs.calls[-1] == ("check", mountpoint)
    run(sn.mounts("container"))
    assert fakefs.calls[-1] == ("check", mountpoint)


def test_mount_failure_falls_back_to_a_normal_snapshot(sn, run, fakefs, caplog):
    caplog.set_level(logging.DEBUG, "stargz.snapshot")
    fakefs.fail_mount = RuntimeError("not an eStargz layer")
    (m,) = run(sn.prepare("extract-1", "", LAYER_LABELS))
    assert m.type == "bind" and m.options == ("rw", "rbind")
    assert run(sn.stat("extract-1")).kind == Kind.ACTIVE
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "not an eStargz layer" in str(warnings[0].error)
    assert warnings[0].reason == "RuntimeError"
    assert sn.fallbacks == {"RuntimeError": 1}
    assert prepared(caplog) == ["false"]
    # containerd then unpacks and commits as usual
    Path(m.source, "file").write_text("unpacked")
    run(sn.commit(CHAIN, "extract-1"))
    assert REMOTE_LABEL not in run(sn.stat(CHAIN)).labels


def test_without_a_filesystem_prepare_always_falls_back_quietly(tmp_path, run, caplog):
    caplog.set_level(logging.DEBUG, "stargz.snapshot")
    sn = run(Snapshotter.open(tmp_path / "root"))
    try:
        (m,) = run(sn.prepare("extract-1", "", LAYER_LABELS))
        assert m.type == "bind"
        assert prepared(caplog) == ["false"]
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        run(sn.close())


def test_prepare_without_target_label_never_asks_the_filesystem(sn, run, fakefs):
    run(sn.prepare("plain", "", {"other": "label"}))
    assert fakefs.calls == []


def test_a_target_that_exists_is_answered_without_creating_or_mounting(sn, run, fakefs, caplog):
    """Another namespace pulling the same layer: its Prepare gets AlreadyExists and leaves
    no active snapshot or second mount behind (upstream leaves both until containerd's GC)."""
    caplog.set_level(logging.DEBUG, "stargz.snapshot")
    with pytest.raises(AlreadyExists):
        run(sn.prepare("extract-1", "", LAYER_LABELS))
    mounts = [c for c in fakefs.calls if c[0] == "mount"]
    with pytest.raises(AlreadyExists, match="target snapshot"):
        run(sn.prepare("extract-2", "", LAYER_LABELS))
    assert prepared(caplog) == ["true"]
    assert [c for c in fakefs.calls if c[0] == "mount"] == mounts
    with pytest.raises(NotFound):
        run(sn.stat("extract-2"))
    assert run(sn.stat(CHAIN)).kind == Kind.COMMITTED


def test_target_committed_meanwhile_still_counts_as_success(sn, run, fakefs, caplog):
    """Two Prepares of one layer race past the check: both succeed, the loser drops its own
    active snapshot and unmounts its copy."""
    caplog.set_level(logging.DEBUG, "stargz.snapshot")
    gate = asyncio.Event()
    mount = fakefs.mount

    async def slow_mount(mountpoint, labels):
        await mount(mountpoint, labels)
        if len([c for c in fakefs.calls if c[0] == "mount"]) == 2:
            gate.set()
        await gate.wait()

    fakefs.mount = slow_mount

    async def both():
        return await asyncio.gather(
            sn.prepare("extract-1", "", LAYER_LABELS),
            sn.prepare("extract-2", "", LAYER_LABELS),
            return_exceptions=True,
        )

    results = run(both())
    assert [type(r) for r in results] == [AlreadyExists, AlreadyExists]
    assert prepared(caplog) == ["true", "true"]
    for key in ("extract-1", "extract-2"):
        with pytest.raises(NotFound):
            run(sn.stat(key))
    assert len([c for c in fakefs.calls if c[0] == "unmount"]) == 1
    assert run(sn.stat(CHAIN)).kind == Kind.COMMITTED


def test_unavailable_remote_layer_fails_mounts(sn, run, fakefs, caplog):
    with pytest.raises(AlreadyExists):
        run(sn.prepare("extract-1", "", LAYER_LABELS))
    run(sn.prepare("c1", CHAIN))
    fakefs.fail_check = OSError("registry unreachable")
    with pytest.raises(Unavailable, match="unavailable"):
        run(sn.prepare("c2", CHAIN))
    with pytest.raises(Unavailable):
        run(sn.mounts("c1"))
    with pytest.raises(Unavailable):
        run(sn.view("v", CHAIN))
    assert any("registry unreachable" in str(getattr(r, "error", "")) for r in caplog.records)
    fakefs.fail_check = None
    run(sn.mounts("c1"))


def test_check_runs_for_every_remote_layer_of_the_chain(sn, run, fakefs):
    parent = ""
    for i in range(3):
        labels = {**LAYER_LABELS, TARGET_SNAPSHOT_LABEL: f"layer{i}"}
        with pytest.raises(AlreadyExists):
            run(sn.prepare(f"extract-{i}", parent, labels))
        parent = f"layer{i}"
    run(sn.prepare("local-key", parent))
    run(sn.commit("local", "local-key"))  # a normally unpacked layer on top
    fakefs.calls.clear()
    run(sn.prepare("container", "local"))
    assert sorted(op for op, _ in fakefs.calls) == ["check"] * 3


def test_remove_unmounts_the_remote_layer_before_deleting_it(sn, run, fakefs):
    with pytest.raises(AlreadyExists):
        run(sn.prepare("extract-1", "", LAYER_LABELS))
    mountpoint = fakefs.calls[0][1]
    run(sn.remove(CHAIN))
    assert fakefs.calls[-1] == ("unmount", mountpoint)
    assert not Path(mountpoint).exists()


def test_restart_remounts_remote_snapshots(tmp_path, run, fakefs):
    root = tmp_path / "root"
    sn = run(Snapshotter.open(root, fakefs))
    with pytest.raises(AlreadyExists):
        run(sn.prepare("extract-1", "", LAYER_LABELS))
    run(sn.prepare("plain", ""))
    mountpoint = fakefs.calls[0][1]
    run(sn.close(unmount_remote=True))
    assert fakefs.calls[-1] == ("unmount", mountpoint)

    fakefs.calls.clear()
    sn = run(Snapshotter.open(root, fakefs))
    assert fakefs.calls == [("mount", mountpoint)]
    assert fakefs.labels[mountpoint][REMOTE_LABEL] == REMOTE_LABEL_VALUE
    run(sn.close())


def test_failed_restore_stops_the_start_unless_invalid_mounts_are_allowed(tmp_path, run, fakefs):
    root = tmp_path / "root"
    sn = run(Snapshotter.open(root, fakefs))
    with pytest.raises(AlreadyExists):
        run(sn.prepare("extract-1", "", LAYER_LABELS))
    run(sn.close())
    fakefs.fail_mount = RuntimeError("registry gone")
    with pytest.raises(Unavailable, match="registry gone"):
        run(Snapshotter.open(root, fakefs))
    sn = run(Snapshotter.open(root, fakefs, allow_invalid_mounts_on_restart=True))
    try:
        assert run(sn.stat(CHAIN)).kind == Kind.COMMITTED  # left for `ctr snapshot rm`
        run(sn.remove(CHAIN))
    finally:
        run(sn.close())
