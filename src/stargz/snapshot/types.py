"""The snapshot model containerd speaks, and the filesystem seam a remote layer plugs into.

A *snapshot* is a directory tree that containerd assembles a container rootfs from. There
are three kinds:

- **Active** (``Prepare``): writable. Its changes go to its own upper directory, on top of
  the read-only chain of its parent.
- **View** (``View``): read-only access to a parent chain. It can never be committed.
- **Committed** (``Commit``): an active snapshot frozen under a *name*. It is the only kind
  that can be a parent.

``key`` names an active snapshot or a view. ``name`` names a committed snapshot. Both live
in one key space, so a key and a name never collide. ``parent`` is always the name of a
committed snapshot. Once a committed snapshot has children, it cannot be removed.

There is ONE key space for the whole daemon, as in containerd's own snapshotters (their
MetaStore has no namespaces). containerd's metadata layer scopes the keys it sends itself
(``<namespace>/<n>/<key>``); the one exception is the chain-ID name of a remote snapshot
(the ``containerd.io/snapshot.ref`` target), which is global on purpose: every namespace
that pulls the layer finds the same committed snapshot. The gRPC metadata
``containerd-namespace`` arrives on some paths only (CRI's in-process calls carry it,
requests that reach containerd over its API, like ``ctr``'s, and its garbage collector's do
not), so the daemon may log it but never lets it split keys.

Remote snapshots (SPEC §2): when ``Prepare`` carries the label ``containerd.io/snapshot.ref``
(the chainID containerd wants), the snapshotter asks a :class:`FileSystem` to mount that
layer at the new snapshot's upper directory. If that works, it commits the snapshot under
the target name with the label ``containerd.io/snapshot/remote`` and answers
``ALREADY_EXISTS``, so containerd skips download and unpack of that layer.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

#: Set by containerd's unpacker on Prepare: the chainID of the committed snapshot it wants.
TARGET_SNAPSHOT_LABEL = "containerd.io/snapshot.ref"
#: Set by the snapshotter on a snapshot whose upper directory is a remote (lazy) mount.
REMOTE_LABEL = "containerd.io/snapshot/remote"
REMOTE_LABEL_VALUE = "remote snapshot"
#: The structured-log field that says whether Prepare made a remote snapshot.
REMOTE_SNAPSHOT_LOG_KEY = "remote-snapshot-prepared"
#: containerd's limit on len(key) + len(value) of one label, in bytes.
MAX_LABEL_SIZE = 4096


class Kind(enum.IntEnum):
    """Snapshot kind; values are those of ``containerd.services.snapshots.v1.Kind`` on the wire."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def filter_name(self) -> str:
        """The spelling containerd's filters use: ``kind==active``."""
        return self.name.lower()


@dataclass(frozen=True)
class Info:
    """What ``Stat``/``List`` return about one snapshot.

    ``name`` is the key (active, view) or the name (committed); ``parent`` is the name of
    the committed parent or ``""``. Times are nanoseconds since the epoch (UTC).
    """

    name: str
    kind: Kind
    parent: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    created_ns: int = 0
    updated_ns: int = 0


@dataclass(frozen=True)
class Usage:
    """Disk usage: bytes (allocated blocks × 512, each inode counted once) and inodes."""

    size: int = 0
    inodes: int = 0


@dataclass(frozen=True)
class Mount:
    """One mount(2) call, as ``containerd.types.Mount`` carries it."""

    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""


@runtime_checkable
class FileSystem(Protocol):
    """What the snapshotter needs from a remote (lazy) filesystem. ``stargz.fs`` implements it.

    All three are coroutines running on the daemon's event loop.

    - ``mount(mountpoint, labels)`` makes the layer named by the snapshot labels appear at
      ``mountpoint`` (an existing empty directory). Raise any exception to refuse; the
      snapshotter then falls back to a normal unpack. On failure the mountpoint must be
      left empty and unmounted.
    - ``check(mountpoint, labels)`` is called before each use of a mounted layer (each
      ``Mounts``/``Prepare``/``View`` over it). Raise if the layer can't serve reads; the
      snapshotter then answers ``UNAVAILABLE``.
    - ``unmount(mountpoint)`` is called before a remote snapshot's directory is removed, and
      on graceful shutdown. It must tolerate a mountpoint that is not mounted.

    Optional attribute (read with ``getattr``): ``connection_kept``, True when the
    filesystem took over a previous daemon's live mounts; the snapshotter's restore then
    leaves the existing mounts in place and ``mount`` must accept a mountpoint that is
    already a mount of that layer.
    """

    async def mount(self, mountpoint: str, labels: Mapping[str, str]) -> None: ...

    async def check(self, mountpoint: str, labels: Mapping[str, str]) -> None: ...

    async def unmount(self, mountpoint: str) -> None: ...
