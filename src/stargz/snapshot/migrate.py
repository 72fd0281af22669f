"""The metadata schema, and the upgrade of databases written by older daemons.

Schema 1 kept ``(namespace, key)`` unique, splitting keys by the ``containerd-namespace``
gRPC metadata. containerd sends that metadata on some paths only (CRI's in-process calls)
and not on others (requests that reach containerd over its own API, e.g. ``ctr``), so a
remote snapshot committed under a namespace was not found as a parent by a request without
one. Schema 2 has one key space, as containerd's own snapshotters do.

Moving schema 1 rows into one key space can meet the same key twice. containerd's keys are
``<namespace>/<n>/<key>`` and unique already; only a chain-ID name of a remote snapshot,
committed once per namespace, can repeat. Of each such group the oldest committed row is
kept (deterministic, and the one any other namespace's snapshots were built on first); the
children of the others are re-pointed to it, the others are dropped (their directories are
then owned by nobody, and ``Cleanup`` reclaims them), and every merge is logged.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import defaultdict

from stargz.errors import FailedPrecondition

from .types import Kind

log = logging.getLogger("stargz.snapshot")

SCHEMA_VERSION = 2

_TABLE = """
CREATE TABLE {name} (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    key       TEXT    NOT NULL UNIQUE,
    kind      INTEGER NOT NULL,
    parent_id INTEGER REFERENCES snapshots (id),
    labels    TEXT    NOT NULL DEFAULT '{{}}',
    created   INTEGER NOT NULL,
    updated   INTEGER NOT NULL,
    size      INTEGER NOT NULL DEFAULT 0,
    inodes    INTEGER NOT NULL DEFAULT 0
)
"""
_INDEX = "CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots (parent_id)"
_COLUMNS = "id, key, kind, parent_id, labels, created, updated, size, inodes"

#: The statements that create the current schema in an empty database.
SCHEMA = (_TABLE.format(name="snapshots"), _INDEX)


def _has_table(c: sqlite3.Connection) -> bool:
    row = c.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'snapshots'")
    return row.fetchone() is not None


def upgrade(c: sqlite3.Connection, path: str) -> None:
    """Bring the database to :data:`SCHEMA_VERSION`, inside the caller's write transaction.

    Must run with ``PRAGMA foreign_keys = OFF`` (the table is rebuilt).
    """
    (version,) = c.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise FailedPrecondition(
            f"{path}: metadata schema {version} is newer than this daemon "
            f"understands ({SCHEMA_VERSION})"
        )
    if version == SCHEMA_VERSION:
        return
    if not _has_table(c):
        for statement in SCHEMA:
            c.execute(statement)
    elif version == 1:
        _from_1(c, path)
    else:
        raise FailedPrecondition(f"{path}: unknown metadata schema {version}")
    c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _from_1(c: sqlite3.Connection, path: str) -> None:
    """Schema 1 -> 2: one key space (merging repeated keys), no namespace column."""
    rows = c.execute("SELECT id, namespace, key, kind FROM snapshots ORDER BY id").fetchall()
    by_key: dict[str, list[tuple[int, str, int]]] = defaultdict(list)
    for sid, ns, key, kind in rows:
        by_key[key].append((sid, ns, kind))
    merged = 0
    for key, group in by_key.items():
        if len(group) > 1:
            _merge(c, path, key, group)
            merged += len(group) - 1
    (seq,) = c.execute(
        "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'snapshots'"
    ).fetchone()
    c.execute(_TABLE.format(name="snapshots_v2"))
    c.execute(f"INSERT INTO snapshots_v2 ({_COLUMNS}) SELECT {_COLUMNS} FROM snapshots")
    c.execute("DROP TABLE snapshots")
    c.execute("ALTER TABLE snapshots_v2 RENAME TO snapshots")
    c.execute(_INDEX)
    # Ids stay never reused: keep the counter where schema 1 left it.
    c.execute("DELETE FROM sqlite_sequence WHERE name = 'snapshots'")
    (top,) = c.execute("SELECT coalesce(max(id), 0) FROM snapshots").fetchone()
    c.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('snapshots', ?)", (max(seq, top),))
    broken = c.execute("PRAGMA foreign_key_check (snapshots)").fetchall()
    if broken:
        raise FailedPrecondition(f"{path}: parent links broken after migration: {broken[:5]}")
    log.info(
        "migrated snapshot metadata to one key space",
        extra={"path": path, "from_schema": 1, "to_schema": SCHEMA_VERSION, "merged": merged},
    )


def _merge(c: sqlite3.Connection, path: str, key: str, group: list[tuple[int, str, int]]) -> None:
    """Keep the oldest committed row of ``key`` (else the oldest), re-point children to it."""
    keep = min(group, key=lambda g: (g[2] != Kind.COMMITTED, g[0]))
    dropped = [g for g in group if g is not keep]
    children: list[int] = []
    for sid, _, _ in dropped:
        children += [
            i for (i,) in c.execute("SELECT id FROM snapshots WHERE parent_id = ?", (sid,))
        ]
        c.execute("UPDATE snapshots SET parent_id = ? WHERE parent_id = ?", (keep[0], sid))
        c.execute("DELETE FROM snapshots WHERE id = ?", (sid,))
    log.warning(
        "merged a snapshot key that existed in several namespaces",
        extra={
            "path": path,
            "key": key,
            "kept_id": keep[0],
            "kept_namespace": keep[1],
            "dropped_ids": [g[0] for g in dropped],
            "dropped_namespaces": [g[1] for g in dropped],
            "dropped_kinds": [Kind(g[2]).name for g in dropped],
            "children_repointed": children,
        },
    )
