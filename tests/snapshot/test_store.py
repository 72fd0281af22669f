"""The SQLite metadata store on its own."""

from __future__ import annotations

import json
import sqlite3

import pytest

from stargz.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from stargz.snapshot import Kind, Usage
from stargz.snapshot.store import SCHEMA_VERSION, MetaStore

from .conftest import SCHEMA_1


@pytest.fixture
def store(tmp_path):
    s = MetaStore(str(tmp_path / "metadata.db"))
    yield s
    s.close()


def committed(store: MetaStore, name: str, parent: str = "") -> int:
    with store.transaction(True) as tx:
        snap = tx.create_snapshot(Kind.ACTIVE, name + "-key", parent, None, 1)
        tx.commit_active(name + "-key", name, Usage(10, 2), {"c": "1"}, 2)
    return snap.id


def test_database_is_wal_with_full_sync(store):
    c = store._c
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert c.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_failed_operation_leaves_nothing(store):
    with pytest.raises(RuntimeError), store.transaction(True) as tx:
        tx.create_snapshot(Kind.ACTIVE, "a", "", {"x": "y"}, 1)
        raise RuntimeError("crash inside the transaction")
    with store.transaction(False) as tx:
        assert tx.walk() == []


def test_state_survives_reopen(tmp_path):
    path = str(tmp_path / "m.db")
    s = MetaStore(path)
    committed(s, "base")
    s.close()
    s = MetaStore(path)
    with s.transaction(False) as tx:
        sid, info, usage = tx.get_info("base")
    assert (info.kind, dict(info.labels), usage) == (Kind.COMMITTED, {"c": "1"}, Usage(10, 2))
    s.close()


def test_ids_are_never_reused(store):
    first = committed(store, "a")
    with store.transaction(True) as tx:
        tx.remove("a")
    assert committed(store, "b") > first


def test_parent_chain_is_nearest_first_and_deep(store):
    ids, parent = [], ""
    for i in range(130):
        ids.append(committed(store, f"l{i}", parent))
        parent = f"l{i}"
    with store.transaction(True) as tx:
        snap = tx.create_snapshot(Kind.ACTIVE, "top", parent, None, 3)
    assert list(snap.parent_ids) == ids[::-1]
    assert [dict(lb) for lb in snap.parent_labels] == [{"c": "1"}] * 130


def test_create_checks_parent_before_key(store):
    with store.transaction(True) as tx:
        tx.create_snapshot(Kind.ACTIVE, "a", "", None, 1)
    with pytest.raises(NotFound, match="missing parent"), store.transaction(True) as tx:
        tx.create_snapshot(Kind.ACTIVE, "a", "nope", None, 1)
    with pytest.raises(InvalidArgument, match="not committed"), store.transaction(True) as tx:
        tx.create_snapshot(Kind.ACTIVE, "b", "a", None, 1)
    with pytest.raises(AlreadyExists), store.transaction(True) as tx:
        tx.create_snapshot(Kind.ACTIVE, "a", "", None, 1)
    with pytest.raises(InvalidArgument, match="COMMITTED"), store.transaction(True) as tx:
        tx.create_snapshot(Kind.COMMITTED, "c", "", None, 1)


def test_commit_checks_in_containerd_order(store):
    committed(store, "taken")
    with pytest.raises(AlreadyExists), store.transaction(True) as tx:
        tx.commit_active("missing", "taken", Usage(), None, 1)  # name first
    with pytest.raises(NotFound), store.transaction(True) as tx:
        tx.commit_active("missing", "free", Usage(), None, 1)


def test_remove_refuses_children_and_database_enforces_it_too(store):
    pid = committed(store, "base")
    with store.transaction(True) as tx:
        tx.create_snapshot(Kind.VIEW, "v", "base", None, 1)
    with pytest.raises(FailedPrecondition, match="child"), store.transaction(True) as tx:
        tx.remove("base")
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


# --- upgrade from schema 1 (keys split by containerd-namespace) --------------------------

REMOTE = '{"containerd.io/snapshot/remote": "remote snapshot"}'

#: (id, namespace, key, kind, parent id, labels): one lazily pulled image in two
#: namespaces (chain IDs committed twice), a container and a view on top, and others.
V1_ROWS = [
    (3, "k8s.io", "sha256:c1", Kind.COMMITTED, None, REMOTE),
    (4, "k8s.io", "sha256:c2", Kind.COMMITTED, 3, REMOTE),
    (5, "k8s.io", "k8s.io/7/pod", Kind.ACTIVE, 4, "{}"),
    (8, "default", "sha256:c1", Kind.COMMITTED, None, REMOTE),
    (9, "default", "sha256:c2", Kind.COMMITTED, 8, REMOTE),
    (10, "default", "default/12/look", Kind.VIEW, 9, "{}"),
    (11, "default", "default/13/plain", Kind.COMMITTED, None, '{"c": "1"}'),
    (12, "a", "same", Kind.ACTIVE, None, "{}"),
    (13, "b", "same", Kind.COMMITTED, None, "{}"),
    (14, "", "no-namespace", Kind.ACTIVE, 11, "{}"),
]


def make_v1_database(path: str, *, last_id: int = 40) -> None:
    """A database as schema 1 wrote it, ids handed out up to ``last_id``."""
    c = sqlite3.connect(path)
    c.executescript(SCHEMA_1)
    for sid, ns, key, kind, parent, labels in V1_ROWS:
        c.execute(
            "INSERT INTO snapshots (id, namespace, key, kind, parent_id, labels, created, "
            "updated, size, inodes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 5, 1)",
            (sid, ns, key, int(kind), parent, labels, sid, sid),
        )
    c.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'snapshots'", (last_id,))
    c.execute("PRAGMA user_version = 1")
    c.commit()
    c.close()


def test_schema_1_database_is_migrated_into_one_key_space(tmp_path, caplog):
    path = str(tmp_path / "metadata.db")
    make_v1_database(path)
    with caplog.at_level("INFO", logger="stargz.snapshot"):
        s = MetaStore(path)
    try:
        c = s._c
        assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        cols = [r[1] for r in c.execute("PRAGMA table_info(snapshots)")]
        assert "namespace" not in cols
        assert c.execute("PRAGMA foreign_key_check").fetchall() == []
        with s.transaction(False) as tx:
            got = {i.name: (i.kind, i.parent) for i in tx.walk()}
            ids = {i.name: tx.get_info(i.name)[0] for i in tx.walk()}
            top = tx.get_snapshot("default/12/look")
            pod = tx.get_snapshot("k8s.io/7/pod")
        assert got == {
            "sha256:c1": (Kind.COMMITTED, ""),
            "sha256:c2": (Kind.COMMITTED, "sha256:c1"),
            "k8s.io/7/pod": (Kind.ACTIVE, "sha256:c2"),
            "default/12/look": (Kind.VIEW, "sha256:c2"),
            "default/13/plain": (Kind.COMMITTED, ""),
            "same": (Kind.COMMITTED, ""),
            "no-namespace": (Kind.ACTIVE, "default/13/plain"),
        }
        # The oldest committed row of a repeated key is kept (its id names its directory);
        # the other namespace's view now stands on it.
        assert (ids["sha256:c1"], ids["sha256:c2"], ids["same"]) == (3, 4, 13)
        assert top.parent_ids == pod.parent_ids == (4, 3)
        assert [dict(lb) for lb in top.parent_labels] == [json.loads(REMOTE)] * 2
        assert ids["no-namespace"] == 14 and ids["default/13/plain"] == 11
        with s.transaction(False) as tx:
            assert tx.ids() == {3, 4, 5, 10, 11, 13, 14}
        # The merge is logged, with what was dropped and re-pointed.
        merges = {r.key: r for r in caplog.records if getattr(r, "kept_id", None)}
        assert set(merges) == {"sha256:c1", "sha256:c2", "same"}
        assert (merges["sha256:c1"].dropped_ids, merges["sha256:c1"].children_repointed) == (
            [8],
            [9],
        )
        assert (merges["sha256:c2"].dropped_ids, merges["sha256:c2"].children_repointed) == (
            [9],
            [10],
        )
        assert merges["same"].dropped_kinds == ["ACTIVE"] and merges["same"].kept_id == 13
        assert all(r.levelname == "WARNING" for r in merges.values())
        # Ids are still never reused, and the single key space holds from now on.
        assert committed(s, "new") > 40
        with pytest.raises(AlreadyExists), s.transaction(True) as tx:
            tx.create_snapshot(Kind.ACTIVE, "sha256:c1", "", None, 1)
    finally:
        s.close()
    # Opening again changes nothing.
    s = MetaStore(path)
    with s.transaction(False) as tx:
        assert len(tx.walk()) == 8
    s.close()


def test_schema_1_database_upgrade_is_all_or_nothing(tmp_path):
    """A schema 1 database whose rows can't be moved stays as it was."""
    path = str(tmp_path / "metadata.db")
    make_v1_database(path)
    c = sqlite3.connect(path)
    c.execute("PRAGMA foreign_keys = OFF")
    c.execute("UPDATE snapshots SET parent_id = 999 WHERE id = 14")  # a dangling parent
    c.commit()
    c.close()
    with pytest.raises(FailedPrecondition, match="parent links broken"):
        MetaStore(path)
    c = sqlite3.connect(path)
    assert c.execute("PRAGMA user_version").fetchone()[0] == 1
    assert c.execute("SELECT count(*) FROM snapshots").fetchone()[0] == len(V1_ROWS)
    c.close()
