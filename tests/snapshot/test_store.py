"""The SQLite metadata store on its own."""

from __future__ import annotations

import sqlite3

import pytest

from stargz.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from stargz.snapshot import Kind, Usage
from stargz.snapshot.store import SCHEMA_VERSION, MetaStore


@pytest.fixture
def store(tmp_path):
    s = MetaStore(str(tmp_path / "metadata.db"))
    yield s
    s.close()


def committed(store: MetaStore, ns: str, name: str, parent: str = "") -> int:
    with store.transaction(True) as tx:
        snap = tx.create_snapshot(ns, Kind.ACTIVE, name + "-key", parent, None, 1)
        tx.commit_active(ns, name + "-key", name, Usage(10, 2), {"c": "1"}, 2)
    return snap.id


def test_database_is_wal_with_full_sync(store):
    c = store._c
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert c.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_failed_operation_leaves_nothing(store):
    with pytest.raises(RuntimeError), store.transaction(True) as tx:
        tx.create_snapshot("", Kind.ACTIVE, "a", "", {"x": "y"}, 1)
        raise RuntimeError("crash inside the transaction")
    with store.transaction(False) as tx:
        assert tx.walk(None) == []


def test_state_survives_reopen(tmp_path):
    path = str(tmp_path / "m.db")
    s = MetaStore(path)
    committed(s, "ns", "base")
    s.close()
    s = MetaStore(path)
    with s.transaction(False) as tx:
        sid, info, usage = tx.get_info("ns", "base")
    assert (info.kind, dict(info.labels), usage) == (Kind.COMMITTED, {"c": "1"}, Usage(10, 2))
    s.close()


def test_ids_are_never_reused(store):
    first = committed(store, "", "a")
    with store.transaction(True) as tx:
        tx.remove("", "a")
    assert committed(store, "", "b") > first


def test_parent_chain_is_nearest_first_and_deep(store):
    ids, parent = [], ""
    for i in range(130):
        ids.append(committed(store, "ns", f"l{i}", parent))
        parent = f"l{i}"
    with store.transaction(True) as tx:
        snap = tx.create_snapshot("ns", Kind.ACTIVE, "top", parent, None, 3)
    assert list(snap.parent_ids) == ids[::-1]
    assert [dict(lb) for lb in snap.parent_labels] == [{"c": "1"}] * 130


def test_create_checks_parent_before_key(store):
    with store.transaction(True) as tx:
        tx.create_snapshot("ns", Kind.ACTIVE, "a", "", None, 1)
    with pytest.raises(NotFound, match="missing parent"), store.transaction(True) as tx:
        tx.create_snapshot("ns", Kind.ACTIVE, "a", "nope", None, 1)
    with pytest.raises(InvalidArgument, match="not committed"), store.transaction(True) as tx:
        tx.create_snapshot("ns", Kind.ACTIVE, "b", "a", None, 1)
    with pytest.raises(AlreadyExists), store.transaction(True) as tx:
        tx.create_snapshot("ns", Kind.ACTIVE, "a", "", None, 1)
    with pytest.raises(InvalidArgument, match="COMMITTED"), store.transaction(True) as tx:
        tx.create_snapshot("ns", Kind.COMMITTED, "c", "", None, 1)


def test_commit_checks_in_containerd_order(store):
    committed(store, "ns", "taken")
    with pytest.raises(AlreadyExists), store.transaction(True) as tx:
        tx.commit_active("ns", "missing", "taken", Usage(), None, 1)  # name first
    with pytest.raises(NotFound), store.transaction(True) as tx:
        tx.commit_active("ns", "missing", "free", Usage(), None, 1)


def test_remove_refuses_children_and_database_enforces_it_too(store):
    pid = committed(store, "ns", "base")
    with store.transaction(True) as tx:
        tx.create_snapshot("ns", Kind.VIEW, "v", "base", None, 1)
    with pytest.raises(FailedPrecondition, match="child"), store.transaction(True) as tx:
        tx.remove("ns", "base")
    with pytest.raises(sqlite3.IntegrityError), store.transaction(True) as tx:
        tx._c.execute("DELETE FROM snapshots WHERE id = ?", (pid,))


def test_newer_schema_is_refused(tmp_path):
    path = str(tmp_path / "m.db")
    MetaStore(path).close()
    c = sqlite3.connect(path)
    c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    c.commit()
    c.close()
    with pytest.raises(FailedPrecondition, match="newer"):
        MetaStore(path)
