"""Snapshot metadata in SQLite: one row per snapshot, one transaction per operation.

The rules are containerd's ``snapshots/storage`` (the bolt MetaStore the overlay snapshotter
uses), carried over to SQL:

- ``key`` is unique: one key space for the whole daemon, as in containerd's MetaStore (it has
  no namespaces; containerd's metadata layer prefixes keys itself). A commit keeps the row
  (and so the ``id`` that names the snapshot's directory) and renames ``key`` to the
  committed ``name``.
- ``parent_id`` points to a committed row. A row with children can't be removed.
- Ids come from ``AUTOINCREMENT``, so an id is never handed out twice while it is committed,
  and a directory being deleted for a removed snapshot can't be confused with a new one.
- Labels with an empty value are dropped when written, as containerd's ``WriteLabels`` does.

The database runs in WAL mode with ``synchronous=FULL``: once a transaction returns, the
snapshot survives a crash of the daemon or of the machine.

Schema 1 kept ``(namespace, key)`` unique; opening such a database migrates it (see
``migrate.py``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from stargz.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from stargz.private import narrow_file, private_file

from . import migrate
from .types import Info, Kind, Usage

#: The metadata schema this daemon writes (see migrate.py).
SCHEMA_VERSION = migrate.SCHEMA_VERSION

_SELECT = """
SELECT s.id, s.key, s.kind, p.key, s.labels, s.created, s.updated, s.size, s.inodes
FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id
"""


def q(s: str) -> str:
    """Quote like Go's ``%q``, so messages read like containerd's."""
    return json.dumps(s, ensure_ascii=False)


@dataclass(frozen=True)
class Snapshot:
    """What mounts are made from: the snapshot's id and kind, and its parent chain.

    ``parent_ids`` runs from the direct parent down to the base layer (overlay's
    ``lowerdir`` order); ``parent_labels`` is aligned with it.
    """

    id: int
    kind: Kind
    parent_ids: tuple[int, ...] = ()
    parent_labels: tuple[Mapping[str, str], ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class _Row:
    id: int
    info: Info
    usage: Usage


def _row(r: tuple) -> _Row:
    sid, key, kind, parent, labels, created, updated, size, inodes = r
    info = Info(
        name=key,
        kind=Kind(kind),
        parent=parent or "",
        labels=json.loads(labels),
        created_ns=created,
        updated_ns=updated,
    )
    return _Row(sid, info, Usage(size, inodes))


def _labels_json(labels: Mapping[str, str] | None) -> str:
    return json.dumps({k: v for k, v in (labels or {}).items() if v != ""}, sort_keys=True)


class Tx:
    """Operations inside one transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._c = conn

    # --- lookups --------------------------------------------------------------------

    def _find(self, key: str) -> _Row | None:
        row = self._c.execute(_SELECT + "WHERE s.key = ?", (key,)).fetchone()
        return _row(row) if row else None

    def _get(self, key: str) -> _Row:
        row = self._find(key)
        if row is None:
            raise NotFound(f"snapshot {q(key)}")
        return row

    def _chain(self, sid: int) -> list[tuple[int, dict[str, str]]]:
        """``sid`` and its ancestors, nearest first, with their labels."""
        rows = self._c.execute(
            """
            WITH RECURSIVE chain (id, parent_id, labels, depth) AS (
                SELECT id, parent_id, labels, 0 FROM snapshots WHERE id = ?
                UNION ALL
                SELECT s.id, s.parent_id, s.labels, c.depth + 1
                FROM snapshots s JOIN chain c ON s.id = c.parent_id
            )
            SELECT id, labels FROM chain ORDER BY depth
            """,
            (sid,),
        ).fetchall()
        return [(i, json.loads(lb)) for i, lb in rows]

    def get_info(self, key: str) -> tuple[int, Info, Usage]:
        row = self._get(key)
        return row.id, row.info, row.usage

    def get_snapshot(self, key: str) -> Snapshot:
        """The snapshot to mount; only an active snapshot or a view has mounts."""
        row = self._find(key)
        if row is None:
            raise NotFound(f"snapshot {q(key)} does not exist")
        if row.info.kind not in (Kind.ACTIVE, Kind.VIEW):
            raise FailedPrecondition(f"requested snapshot {q(key)} not active or view")
        chain = self._chain(row.id)[1:]
        return Snapshot(
            row.id, row.info.kind, tuple(i for i, _ in chain), tuple(lb for _, lb in chain)
        )

    def chain_labels(self, key: str) -> list[tuple[int, dict[str, str]]]:
        """``key`` and every snapshot under it, nearest first, with their labels."""
        return self._chain(self._get(key).id)

    def walk(self) -> list[Info]:
        return [_row(r).info for r in self._c.execute(_SELECT + "ORDER BY s.key")]

    def ids(self) -> set[int]:
        return {i for (i,) in self._c.execute("SELECT id FROM snapshots")}

    # --- changes --------------------------------------------------------------------

    def create_snapshot(
        self,
        kind: Kind,
        key: str,
        parent: str,
        labels: Mapping[str, str] | None,
        now_ns: int,
    ) -> Snapshot:
        if kind not in (Kind.ACTIVE, Kind.VIEW):
            raise InvalidArgument(
                f"snapshot type {kind.name} invalid; only snapshots of type Active or View "
                "can be created"
            )
        if not key:
            raise InvalidArgument("snapshot key must not be empty")
        parent_id = None
        chain: list[tuple[int, dict[str, str]]] = []
        if parent:
            prow = self._find(parent)
            if prow is None:
                raise NotFound(f"missing parent {q(parent)}")
            if prow.info.kind != Kind.COMMITTED:
                raise InvalidArgument(f"parent {q(parent)} is not committed snapshot")
            parent_id = prow.id
            chain = self._chain(parent_id)
        if self._find(key) is not None:
            raise AlreadyExists(f"snapshot {q(key)}")
        cur = self._c.execute(
            "INSERT INTO snapshots (key, kind, parent_id, labels, created, updated) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (key, int(kind), parent_id, _labels_json(labels), now_ns, now_ns),
        )
        assert cur.lastrowid is not None
        return Snapshot(
            cur.lastrowid, kind, tuple(i for i, _ in chain), tuple(lb for _, lb in chain)
        )

    def commit_active(
        self,
        key: str,
        name: str,
        usage: Usage,
        labels: Mapping[str, str] | None,
        now_ns: int,
        expect_id: int | None = None,
    ) -> int:
        """Freeze active ``key`` as ``name`` (labels are replaced, not inherited)."""
        if not name:
            raise InvalidArgument("committed snapshot name must not be empty")
        if self._find(name) is not None:
            raise AlreadyExists(f"committed snapshot {q(name)}")
        row = self._find(key)
        if row is None:
            raise NotFound(f"failed to get active snapshot {q(key)}")
        if row.info.kind != Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {q(key)} is not active")
        if expect_id is not None and row.id != expect_id:
            raise _Changed(row.id)
        self._c.execute(
            "UPDATE snapshots SET key = ?, kind = ?, labels = ?, created = ?, updated = ?, "
            "size = ?, inodes = ? WHERE id = ?",
            (
                name,
                int(Kind.COMMITTED),
                _labels_json(labels),
                now_ns,
                now_ns,
                usage.size,
                usage.inodes,
                row.id,
            ),
        )
        return row.id

    def remove(self, key: str) -> tuple[int, Kind]:
        row = self._get(key)
        child = self._c.execute(
            "SELECT key FROM snapshots WHERE parent_id = ? LIMIT 1", (row.id,)
        ).fetchone()
        if child is not None:
            raise FailedPrecondition(f"cannot remove snapshot {q(key)} with child {q(child[0])}")
        self._c.execute("DELETE FROM snapshots WHERE id = ?", (row.id,))
        return row.id, row.info.kind

    def update_info(
        self,
        name: str,
        labels: Mapping[str, str] | None,
        fieldpaths: Sequence[str],
        now_ns: int,
    ) -> Info:
        """Update the mutable fields (only labels) of ``name``, as containerd's UpdateInfo."""
        row = self._get(name)
        given = dict(labels or {})
        updated = dict(row.info.labels)
        if fieldpaths:
            for path in fieldpaths:
                if path.startswith("labels."):
                    k = path[len("labels.") :]
                    updated[k] = given.get(k, "")
                elif path == "labels":
                    updated = dict(given)
                else:
                    raise InvalidArgument(f"cannot update {q(path)} field on snapshot {q(name)}")
        else:
            updated = dict(given)
        text = _labels_json(updated)
        self._c.execute(
            "UPDATE snapshots SET labels = ?, updated = ? WHERE id = ?", (text, now_ns, row.id)
        )
        return Info(
            name=row.info.name,
            kind=row.info.kind,
            parent=row.info.parent,
            labels=json.loads(text),
            created_ns=row.info.created_ns,
            updated_ns=now_ns,
        )


class _Changed(Exception):
    """The key now names another snapshot than the one measured (internal retry signal)."""

    def __init__(self, new_id: int) -> None:
        super().__init__(new_id)
        self.new_id = new_id


class MetaStore:
    """The SQLite file. Use :meth:`transaction`; it is safe to call from any one thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        # SQLite gives the -wal and -shm files the mode of the database file
        private_file(path)
        for side in (f"{path}-wal", f"{path}-shm", f"{path}-journal"):
            narrow_file(side)
        self._c = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._c.execute("PRAGMA journal_mode = WAL")
        self._c.execute("PRAGMA synchronous = FULL")
        self._c.execute("PRAGMA busy_timeout = 10000")
        with self._lock:
            # Foreign keys off while an older schema's table is rebuilt (SQLite ignores this
            # pragma inside a transaction).
            self._c.execute("PRAGMA foreign_keys = OFF")
            self._c.execute("BEGIN IMMEDIATE")
            try:
                migrate.upgrade(self._c, path)
                self._c.execute("COMMIT")
            except BaseException:
                self._c.execute("ROLLBACK")
                raise
            self._c.execute("PRAGMA foreign_keys = ON")

    @contextmanager
    def transaction(self, write: bool) -> Iterator[Tx]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        with self._lock:
            self._c.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield Tx(self._c)
            except BaseException:
                self._c.execute("ROLLBACK")
                raise
            self._c.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._c.close()
