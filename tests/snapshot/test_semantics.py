"""The snapshot-semantics suite (containerd's SnapshotterSuite, in spirit): every case runs
against the in-process Snapshotter and against the daemon over its gRPC socket."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from stargz.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from stargz.snapshot import Info, Kind, Mount
from stargz.snapshot.osutil import supports_overlay_index

from .conftest import upper


def fs_dir(b, sid: str) -> Path:
    return Path(b.root, "snapshots", sid, "fs")


def sid_of(b, key: str) -> str:
    """The directory id behind an active snapshot or view, from its mounts."""
    m = b.mounts(key)[0]
    if m.type == "bind":
        return upper(b.root, m.source)
    opts = dict(o.split("=", 1) for o in m.options if "=" in o)
    return upper(b.root, opts["upperdir"])


def overlay_prefix() -> list[str]:
    return ["index=off"] if supports_overlay_index() else []


def chain(b, n: int, prefix: str = "l") -> list[str]:
    """Commit n layers on top of each other; returns their names, base first."""
    names, parent = [], ""
    for i in range(n):
        b.prepare(f"{prefix}{i}-key", parent)
        b.commit(f"{prefix}{i}", f"{prefix}{i}-key")
        names.append(f"{prefix}{i}")
        parent = f"{prefix}{i}"
    return names


# --- mounts -------------------------------------------------------------------------


def test_prepare_without_parent_is_a_rw_bind_of_a_fresh_upper_dir(backend):
    (m,) = backend.prepare("a")
    assert m.type == "bind" and m.options == ("rw", "rbind")
    fs = Path(m.source)
    assert fs.name == "fs" and fs.is_dir() and not any(fs.iterdir())
    assert stat.S_IMODE(fs.stat().st_mode) == 0o755
    assert stat.S_IMODE((fs.parent / "work").stat().st_mode) == 0o711
    assert backend.mounts("a") == [m]


def test_view_without_parent_is_a_ro_bind_and_has_no_work_dir(backend):
    (m,) = backend.view("v")
    assert m.type == "bind" and m.options == ("ro", "rbind")
    assert not (Path(m.source).parent / "work").exists()


def test_active_with_parents_is_overlay_with_lowerdir_nearest_first(backend):
    names = chain(backend, 3)
    (m,) = backend.prepare("top", names[-1])
    assert (m.type, m.source) == ("overlay", "overlay")
    sid = sid_of(backend, "top")
    lowers = [str(fs_dir(backend, i)) for i in _ids(backend, names[::-1])]
    assert list(m.options) == [
        *overlay_prefix(),
        f"workdir={Path(backend.root, 'snapshots', sid, 'work')}",
        f"upperdir={fs_dir(backend, sid)}",
        "lowerdir=" + ":".join(lowers),
    ]


def _ids(b, names: list[str]) -> list[str]:
    """Directory ids of committed snapshots, found through views over each of them."""
    out = []
    for n in names:
        (m,) = b.view(f"probe-{n}", n)
        if m.type == "bind":
            out.append(upper(b.root, m.source))
        else:
            (lower,) = (o for o in m.options if o.startswith("lowerdir="))
            out.append(upper(b.root, lower[len("lowerdir=") :].split(":")[0]))
        b.remove(f"probe-{n}")
    return out


def test_view_of_one_parent_is_a_ro_bind_of_the_parent(backend):
    (base,) = chain(backend, 1)
    (m,) = backend.view("v", base)
    (pid,) = _ids(backend, [base])
    assert m == Mount("bind", str(fs_dir(backend, pid)), ("ro", "rbind"))


def test_view_of_several_parents_is_a_read_only_overlay(backend):
    names = chain(backend, 2)
    (m,) = backend.view("v", names[-1])
    lowers = ":".join(str(fs_dir(backend, i)) for i in _ids(backend, names[::-1]))
    assert m == Mount("overlay", "overlay", (*overlay_prefix(), f"lowerdir={lowers}"))


def test_upper_dir_takes_the_owner_of_the_parent_upper_dir(backend):
    (base,) = chain(backend, 1)
    (pid,) = _ids(backend, [base])
    uid, gid = (1000, 1000) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    os.chown(fs_dir(backend, pid), uid, gid)
    backend.prepare("child", base)
    st = fs_dir(backend, sid_of(backend, "child")).stat()
    assert (st.st_uid, st.st_gid) == (uid, gid)


# --- commit, stat -------------------------------------------------------------------


def test_commit_keeps_the_directory_and_renames_key_to_name(backend):
    (m,) = backend.prepare("a", labels={"x": "1", "keep": "no"})
    Path(m.source, "hello").write_text("world")
    backend.commit("A", "a", labels={"y": "2"})
    info = backend.stat("A")
    assert (info.name, info.kind, info.parent) == ("A", Kind.COMMITTED, "")
    assert dict(info.labels) == {"y": "2"}  # replaced, not inherited
    with pytest.raises(NotFound, match='"a"'):
        backend.stat("a")
    (v,) = backend.view("v", "A")
    assert Path(v.source, "hello").read_text() == "world"


def test_stat_reports_kind_parent_labels_and_times(backend):
    (base,) = chain(backend, 1)
    backend.prepare("act", base, labels={"k": "v"})
    info = backend.stat("act")
    assert (info.name, info.kind, info.parent, dict(info.labels)) == (
        "act",
        Kind.ACTIVE,
        base,
        {"k": "v"},
    )
    assert info.created_ns == info.updated_ns > 0
    backend.view("vw", base)
    assert backend.stat("vw").kind == Kind.VIEW


def test_empty_label_values_are_dropped(backend):
    backend.prepare("a", labels={"x": "", "y": "1"})
    assert dict(backend.stat("a").labels) == {"y": "1"}


# --- the error cases containerd relies on -------------------------------------------


def test_unknown_key_is_not_found_everywhere(backend):
    for call in (
        lambda: backend.stat("nope"),
        lambda: backend.mounts("nope"),
        lambda: backend.usage("nope"),
        lambda: backend.remove("nope"),
        lambda: backend.commit("N", "nope"),
        lambda: backend.update(Info(name="nope", kind=Kind.UNKNOWN, labels={"a": "b"})),
    ):
        with pytest.raises(NotFound, match='"nope"'):
            call()


def test_missing_parent_is_not_found(backend):
    with pytest.raises(NotFound, match='"ghost"'):
        backend.prepare("a", "ghost")
    with pytest.raises(NotFound, match='"ghost"'):
        backend.view("v", "ghost")
    assert backend.list() == []


def test_parent_must_be_committed(backend):
    backend.prepare("active")
    with pytest.raises(InvalidArgument, match='"active"'):
        backend.prepare("child", "active")


def test_duplicate_key_already_exists(backend):
    backend.prepare("a")
    with pytest.raises(AlreadyExists, match='"a"'):
        backend.prepare("a")
    with pytest.raises(AlreadyExists, match='"a"'):
        backend.view("a")
    (base,) = chain(backend, 1)
    with pytest.raises(AlreadyExists, match=f'"{base}"'):
        backend.prepare(base)


def test_commit_of_a_view_is_a_failed_precondition(backend):
    backend.view("v")
    with pytest.raises(FailedPrecondition, match='"v"'):
        backend.commit("V", "v")
    assert backend.stat("v").kind == Kind.VIEW


def test_commit_to_an_existing_name_already_exists(backend):
    (base,) = chain(backend, 1)
    backend.prepare("b")
    with pytest.raises(AlreadyExists, match=f'"{base}"'):
        backend.commit(base, "b")
    assert backend.stat("b").kind == Kind.ACTIVE


def test_commit_checks_the_name_before_the_key(backend):
    (base,) = chain(backend, 1)
    with pytest.raises(AlreadyExists, match=f'"{base}"'):
        backend.commit(base, "no-such-key")


def test_commit_of_a_committed_snapshot_is_a_failed_precondition(backend):
    (base,) = chain(backend, 1)
    with pytest.raises(FailedPrecondition, match=f'"{base}"'):
        backend.commit("again", base)


def test_remove_of_a_snapshot_with_children_is_a_failed_precondition(backend):
    (base,) = chain(backend, 1)
    backend.view("child", base)
    with pytest.raises(FailedPrecondition, match=f'"{base}"'):
        backend.remove(base)
    backend.remove("child")
    backend.remove(base)
    assert backend.list() == []


def test_mounts_of_a_committed_snapshot_is_a_failed_precondition(backend):
    (base,) = chain(backend, 1)
    with pytest.raises(FailedPrecondition, match=f'"{base}"'):
        backend.mounts(base)


def test_empty_key_or_name_is_invalid(backend):
    with pytest.raises(InvalidArgument):
        backend.prepare("")
    backend.prepare("a")
    with pytest.raises(InvalidArgument):
        backend.commit("", "a")


def test_oversized_label_is_invalid(backend):
    with pytest.raises(InvalidArgument, match="maximum size"):
        backend.prepare("a", labels={"k": "v" * 4096})
    assert backend.list() == []
    backend.prepare("a", labels={"k": "v" * 4095})


# --- remove, cleanup ----------------------------------------------------------------


def test_remove_deletes_the_directory_and_frees_the_key(backend):
    (m,) = backend.prepare("a")
    Path(m.source, "f").write_text("x")
    sid = upper(backend.root, m.source)
    backend.remove("a")
    assert not Path(backend.root, "snapshots", sid).exists()
    (m2,) = backend.prepare("a")
    assert int(upper(backend.root, m2.source)) > int(sid)  # ids are never reused


def test_cleanup_removes_only_directories_no_snapshot_owns(backend):
    (m,) = backend.prepare("kept")
    snaps = Path(backend.root, "snapshots")
    for orphan in ("new-123456", "99999", "rm-7"):
        (snaps / orphan / "fs" / "deep").mkdir(parents=True)
        (snaps / orphan / "fs" / "deep" / "file").write_text("x")
    backend.cleanup()
    left = {p.name for p in snaps.iterdir()}
    assert upper(backend.root, m.source) in left
    assert not left & {"new-123456", "99999", "rm-7"}


# --- update -------------------------------------------------------------------------


def test_update_labels_with_field_masks(backend):
    backend.prepare("a", labels={"a": "1", "b": "2"})
    before = backend.stat("a")

    def upd(labels, *paths):
        return backend.update(Info(name="a", kind=Kind.UNKNOWN, labels=labels), paths)

    got = upd({"b": "20", "c": "30"}, "labels.b")
    assert dict(got.labels) == {"a": "1", "b": "20"}
    assert got.created_ns == before.created_ns and got.updated_ns > before.updated_ns
    assert dict(upd({}, "labels.a").labels) == {"b": "20"}  # absent value deletes
    assert dict(upd({"z": "9"}, "labels").labels) == {"z": "9"}
    assert dict(upd({"only": "this"}).labels) == {"only": "this"}  # empty mask = all labels
    assert dict(backend.stat("a").labels) == {"only": "this"}
    for path in ("name", "parent", "kind", "created_at"):
        with pytest.raises(InvalidArgument, match=path):
            upd({"x": "y"}, path)
    with pytest.raises(InvalidArgument, match="maximum size"):
        upd({"k": "v" * 5000}, "labels.k")


def test_update_ignores_immutable_fields_it_is_not_asked_to_change(backend):
    (base,) = chain(backend, 1)
    got = backend.update(Info(name=base, kind=Kind.ACTIVE, parent="bogus", labels={"n": "1"}))
    assert (got.kind, got.parent, dict(got.labels)) == (Kind.COMMITTED, "", {"n": "1"})


# --- list and filters ---------------------------------------------------------------


def test_list_filters(backend):
    backend.prepare("base-key", labels={"containerd.io/gc.root": "x"})
    backend.commit("base", "base-key", labels={"tier": "low", "containerd.io/gc.root": "x"})
    backend.prepare("act", "base", labels={"tier": "high"})
    backend.view("vw", "base")
    backend.prepare("lone")

    def names(*filters):
        return sorted(i.name for i in backend.list(*filters))

    p = backend.prefix  # filters on names see the keys as the daemon stores them
    assert names() == ["act", "base", "lone", "vw"]
    assert names(f"name=={p}act") == ["act"]
    assert names(f"parent=={p}base") == ["act", "vw"]
    assert names("kind==committed") == ["base"]
    assert names("kind==active") == ["act", "lone"]
    assert names("kind==view") == ["vw"]
    assert names('labels."containerd.io/gc.root"') == ["base"]
    assert names("labels.tier==high") == ["act"]
    assert names("labels.tier!=high") == ["base", "lone", "vw"]
    assert names("labels.tier~=^(lo|hi)") == ["act", "base"]
    assert names(f"name~=/^{p}[ab]/") == ["act", "base"]
    assert names(f"kind==active,parent=={p}base") == ["act"]  # comma: AND
    assert names(f"name=={p}lone", "kind==view") == ["lone", "vw"]  # several filters: OR
    assert names(f"name=={p}lone", "") == ["act", "base", "lone", "vw"]
    assert names(f'name=="{p}a\\x63t"') == ["act"]
    for bad in ("name==", "kind=>x", "labels.", '"unterminated', "name==a b"):
        with pytest.raises(InvalidArgument, match="filters"):
            backend.list(bad)


def test_list_is_ordered_by_name(backend):
    for k in ("c", "a", "b"):
        backend.prepare(k)
    assert [i.name for i in backend.list()] == ["a", "b", "c"]


# --- usage --------------------------------------------------------------------------


def test_usage_measures_active_and_records_committed(backend):
    (m,) = backend.prepare("a")
    empty = backend.usage("a")
    assert empty.inodes == 1
    up = Path(m.source)
    (up / "d").mkdir()
    (up / "d" / "big").write_bytes(os.urandom(64 * 1024))
    os.link(up / "d" / "big", up / "hardlink")
    (up / "sym").symlink_to("d/big")
    u = backend.usage("a")
    assert u.inodes == 4  # fs, d, big (= hardlink), sym
    assert u.size >= empty.size + 64 * 1024
    backend.commit("A", "a")
    assert backend.usage("A") == u
    backend.view("v", "A")
    assert backend.usage("v").size == 0
