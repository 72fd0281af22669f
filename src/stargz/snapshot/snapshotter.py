"""containerd snapshot semantics over overlayfs, with remote (lazy) layers through a FileSystem.

On disk, under ``root``::

    metadata.db              SQLite (see store.py)
    snapshots/<id>/fs        the snapshot's upper directory (or a remote layer's mountpoint)
    snapshots/<id>/work      overlay's work directory (active snapshots only)

Every change follows the crash-safe order of containerd's overlay snapshotter:

- A new snapshot's directories are built in ``snapshots/new-XXXX`` and renamed to
  ``snapshots/<id>`` inside the write transaction that inserts its row. A crash leaves either
  the row and its directory, or no row and a directory nobody owns.
- Directories are deleted only after the transaction that removed their row committed.
- :meth:`Snapshotter.cleanup` deletes every directory under ``snapshots/`` that no row owns.

So after a crash at any point, the database is exactly what containerd last saw succeed,
and ``Cleanup`` reclaims the rest.

Metadata transactions run one at a time on a dedicated thread (SQLite has one writer
anyway); directory walks and deletions run on the default executor, so the event loop — and
the FUSE and gRPC work that shares it — never waits for the disk.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from stargz.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from stargz.private import private_dir

from . import filters, osutil
from .refusals import Refusals, reason_of
from .store import MetaStore, Snapshot, Tx, _Changed, q
from .types import (
    MAX_LABEL_SIZE,
    REMOTE_LABEL,
    REMOTE_LABEL_VALUE,
    REMOTE_SNAPSHOT_LOG_KEY,
    TARGET_SNAPSHOT_LABEL,
    FileSystem,
    Info,
    Kind,
    Mount,
    Usage,
)

log = logging.getLogger("stargz.snapshot")

T = TypeVar("T")


def validate_labels(labels: Mapping[str, str] | None) -> None:
    """containerd's ``labels.Validate``: key + value at most 4096 bytes."""
    for k, v in (labels or {}).items():
        if len(k.encode()) + len(v.encode()) > MAX_LABEL_SIZE:
            raise InvalidArgument(
                f"label key and value greater than maximum size ({MAX_LABEL_SIZE} bytes), "
                f"key: {k[:10]}"
            )


class Snapshotter:
    """One snapshotter root. Create it with :meth:`open`; every method is a coroutine.

    Keys live in one key space (see :mod:`stargz.snapshot.types`): no method takes a
    namespace.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        fs: FileSystem | None = None,
        *,
        async_remove: bool = False,
        allow_invalid_mounts_on_restart: bool = False,
    ) -> None:
        self.root = os.path.abspath(root)
        self.snapshots_dir = os.path.join(self.root, "snapshots")
        self.fs = fs
        self.async_remove = async_remove
        self.allow_invalid_mounts_on_restart = allow_invalid_mounts_on_restart
        #: Layers unpacked normally because the FileSystem refused them, by reason (the
        #: exception's class name, e.g. FooterError, DigestMismatch, RegistryError).
        self.fallbacks: collections.Counter[str] = collections.Counter()
        #: The last refusals with their reason code, per target snapshot (`stargz status`).
        self.refusals = Refusals()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="stargz-snapshot-db")
        self._store: MetaStore | None = None
        self._index_off = False
        self._userxattr = False

    @classmethod
    async def open(
        cls,
        root: str | os.PathLike[str],
        fs: FileSystem | None = None,
        **options: bool,
    ) -> Snapshotter:
        """Open (creating if needed) the root, then restore remote snapshots."""
        self = cls(root, fs, **options)
        try:
            await self._db(self._open_sync)
            await self._restore()
        except BaseException:
            await self.close()
            raise
        return self

    def _open_sync(self) -> None:
        private_dir(self.root)
        private_dir(self.snapshots_dir)
        self._store = MetaStore(os.path.join(self.root, "metadata.db"))
        self._index_off = osutil.supports_overlay_index()
        self._userxattr = osutil.needs_userxattr()

    async def close(self, *, unmount_remote: bool = False) -> None:
        """Close the store. With ``unmount_remote``, unmount every remote snapshot first."""
        if unmount_remote and self.fs is not None and self._store is not None:
            for sid, _ in await self._db(self._remote_snapshots):
                try:
                    await self.fs.unmount(self._upper(sid))
                except Exception as e:  # shutting down: report, go on
                    log.warning("failed to unmount remote snapshot", extra={"id": sid, "error": e})
        if self._store is not None:
            await self._db(self._store.close)
            self._store = None
        self._executor.shutdown(wait=True)

    # --- plumbing -------------------------------------------------------------------

    async def _db(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _tx(self, write: bool):  # a context manager of Tx
        if self._store is None:
            raise Unavailable("snapshotter is closed")
        return self._store.transaction(write)

    def _read(self, fn: Callable[[Tx], T]) -> Callable[[], T]:
        def run() -> T:
            with self._tx(False) as tx:
                return fn(tx)

        return run

    def _write(self, fn: Callable[[Tx], T]) -> Callable[[], T]:
        def run() -> T:
            with self._tx(True) as tx:
                return fn(tx)

        return run

    def _upper(self, sid: int) -> str:
        return os.path.join(self.snapshots_dir, str(sid), "fs")

    def _work(self, sid: int) -> str:
        return os.path.join(self.snapshots_dir, str(sid), "work")

    # --- queries --------------------------------------------------------------------

    async def stat(self, key: str) -> Info:
        _, info, _ = await self._db(self._read(lambda tx: tx.get_info(key)))
        return info

    async def _is_committed(self, name: str) -> bool:
        def txn(tx: Tx) -> bool:
            try:
                return tx.get_info(name)[1].kind == Kind.COMMITTED
            except NotFound:
                return False

        return await self._db(self._read(txn))

    async def walk(self, filter_strings: Sequence[str] = ()) -> list[Info]:
        """Every snapshot that matches any filter."""
        match = filters.parse(filter_strings)
        infos = await self._db(self._read(lambda tx: tx.walk()))
        return [i for i in infos if match(i)]

    async def usage(self, key: str) -> Usage:
        """Active snapshots are measured now; committed ones report what Commit measured."""
        sid, info, usage = await self._db(self._read(lambda tx: tx.get_info(key)))
        if info.kind == Kind.ACTIVE:
            usage = await asyncio.to_thread(osutil.disk_usage, self._upper(sid))
        return usage

    async def mounts(self, key: str) -> list[Mount]:
        snap = await self._db(self._read(lambda tx: tx.get_snapshot(key)))
        await self._check_availability(
            snap.id, list(zip(snap.parent_ids, snap.parent_labels, strict=True))
        )
        return self._mounts(snap)

    async def remote_snapshot_names(self) -> dict[str, str]:
        """Mount point -> name of every remote snapshot (for ``stargz status``)."""
        return {self._upper(sid): info.name for sid, info in await self._db(self._remote_snapshots)}

    # --- changes --------------------------------------------------------------------

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        validate_labels(info.labels)
        now = time.time_ns()
        return await self._db(
            self._write(lambda tx: tx.update_info(info.name, info.labels, fieldpaths, now))
        )

    async def view(
        self, key: str, parent: str, labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        snap = await self._create(Kind.VIEW, key, parent, labels)
        await self._check_parents(snap)
        return self._mounts(snap)

    async def prepare(
        self, key: str, parent: str, labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """Create an active snapshot; or, for a layer a FileSystem can mount, a remote one.

        For the remote case (label ``containerd.io/snapshot.ref``), this raises
        :class:`AlreadyExists` after committing the snapshot under the target name: that is
        how containerd learns it can skip downloading the layer (SPEC §7.3).
        """
        labels = dict(labels or {})
        validate_labels(labels)
        target = labels.get(TARGET_SNAPSHOT_LABEL)
        if target is not None and await self._is_committed(target):
            # Another namespace (or client) already has this layer: containerd links its
            # record to the existing snapshot, so nothing is created or mounted for `key`.
            log.debug("target snapshot exists", extra={"key": key, "target": target})
            raise AlreadyExists(f"target snapshot {q(target)}")
        snap = await self._create(Kind.ACTIVE, key, parent, labels)
        if target is not None:
            fields = {"key": key, "parent": parent, "target": target}
            if self.fs is None:
                log.debug(
                    "no remote filesystem: preparing a normal snapshot",
                    extra={**fields, REMOTE_SNAPSHOT_LOG_KEY: "false"},
                )
                self.refusals.record(target, key, labels, "lazy-disabled", "")
            elif await self._mount_remote(snap, labels, fields):
                remote_labels = {**labels, REMOTE_LABEL: REMOTE_LABEL_VALUE}
                try:
                    await self._commit(target, key, remote_labels, measure=False)
                except AlreadyExists:
                    # Someone committed the target first: it exists, which is the point.
                    # Our own mount of it is not needed: drop it with its active snapshot.
                    try:
                        await self.remove(key)
                    except Exception as e:  # Cleanup (containerd's GC) takes it later
                        log.warning("cannot remove surplus snapshot", extra={**fields, "error": e})
                except Exception as e:
                    # Don't fall back: the FileSystem has used this upper directory.
                    log.warning(
                        "failed to internally commit remote snapshot",
                        extra={**fields, REMOTE_SNAPSHOT_LOG_KEY: "false", "error": e},
                    )
                    raise
                log.debug(
                    "prepared remote snapshot", extra={**fields, REMOTE_SNAPSHOT_LOG_KEY: "true"}
                )
                raise AlreadyExists(f"target snapshot {q(target)}")
        await self._check_parents(snap)
        return self._mounts(snap)

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        await self._commit(name, key, labels, measure=True)

    async def remove(self, key: str) -> None:
        def txn(tx: Tx) -> list[str]:
            tx.remove(key)
            return [] if self.async_remove else self._orphan_dirs(tx)

        for d in await self._db(self._write(txn)):
            await self._remove_dir(d)

    async def cleanup(self) -> None:
        """Delete every directory under ``snapshots/`` that no snapshot owns."""
        # A write transaction, so no snapshot is being created while we list.
        dirs = await self._db(self._write(self._orphan_dirs))
        if dirs:
            log.debug("cleanup", extra={"dirs": dirs})
        for d in dirs:
            await self._remove_dir(d)

    # --- internals ------------------------------------------------------------------

    async def _create(
        self,
        kind: Kind,
        key: str,
        parent: str,
        labels: Mapping[str, str] | None,
    ) -> Snapshot:
        validate_labels(labels)
        return await self._db(lambda: self._create_sync(kind, key, parent, labels))

    def _create_sync(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None
    ) -> Snapshot:
        temp: str | None = None
        final: str | None = None
        try:
            with self._tx(True) as tx:
                temp = tempfile.mkdtemp(prefix="new-", dir=self.snapshots_dir)
                os.mkdir(os.path.join(temp, "fs"), 0o755)
                if kind == Kind.ACTIVE:
                    os.mkdir(os.path.join(temp, "work"), 0o711)
                snap = tx.create_snapshot(kind, key, parent, labels, time.time_ns())
                if snap.parent_ids:
                    st = os.stat(self._upper(snap.parent_ids[0]))
                    os.lchown(os.path.join(temp, "fs"), st.st_uid, st.st_gid)
                path = os.path.join(self.snapshots_dir, str(snap.id))
                if os.path.lexists(path):
                    # The id is fresh in this transaction, so this directory was left by a
                    # crash between rename and commit: nobody owns it.
                    self._remove_dir_sync(path)
                os.rename(temp, path)
                temp, final = None, path
            final = None
            return snap
        finally:
            for leftover in (temp, final):
                if leftover is not None:
                    try:
                        osutil.remove_tree(leftover)
                    except OSError as e:
                        log.error(
                            "failed to reclaim snapshot directory, it may need removal",
                            extra={"path": leftover, "error": e},
                        )

    async def _commit(
        self,
        name: str,
        key: str,
        labels: Mapping[str, str] | None,
        *,
        measure: bool,
    ) -> None:
        validate_labels(labels)
        usage, expect = Usage(), None
        if measure:
            # Walk the upper directory outside the transaction: it may be large, and other
            # operations must not wait for it. The id check below catches a key that was
            # removed and prepared again meanwhile.
            try:
                expect, info, _ = await self._db(self._read(lambda tx: tx.get_info(key)))
            except NotFound:
                measure = False  # commit_active reports it, in containerd's order of checks
        for _ in range(5):
            if measure and info.kind == Kind.ACTIVE:
                usage = await asyncio.to_thread(osutil.disk_usage, self._upper(expect))
            try:
                await self._db(
                    self._write(
                        lambda tx, u=usage, e=expect: tx.commit_active(
                            key, name, u, labels, time.time_ns(), e
                        )
                    )
                )
                return
            except _Changed as changed:
                expect = changed.new_id
        raise Unavailable(f"snapshot {q(key)} keeps changing during commit")

    async def _mount_remote(
        self, snap: Snapshot, labels: Mapping[str, str], fields: Mapping[str, str]
    ) -> bool:
        assert self.fs is not None
        mountpoint = self._upper(snap.id)
        log.info("preparing filesystem mount", extra={**fields, "mountpoint": mountpoint})
        try:
            await self.fs.mount(mountpoint, labels)
        except Exception as e:  # any refusal means: unpack normally
            reason = type(e).__name__
            self.fallbacks[reason] += 1
            self.refusals.record(fields["target"], fields["key"], labels, reason_of(e), str(e))
            log.warning(
                "failed to prepare remote snapshot",
                extra={**fields, REMOTE_SNAPSHOT_LOG_KEY: "false", "reason": reason, "error": e},
            )
            return False
        self.refusals.forget(fields["target"])
        return True

    async def _check_parents(self, snap: Snapshot) -> None:
        if snap.parent_ids:
            await self._check_availability(
                snap.parent_ids[0], list(zip(snap.parent_ids, snap.parent_labels, strict=True))
            )

    async def _check_availability(
        self, sid: int, chain: Sequence[tuple[int, Mapping[str, str]]]
    ) -> None:
        """Every remote layer in ``chain`` must answer FileSystem.check (in parallel)."""
        remote = [(i, lb) for i, lb in chain if REMOTE_LABEL in lb]
        if not remote:
            return
        if self.fs is None:
            raise Unavailable(f"layer {q(str(sid))} unavailable: no remote filesystem configured")
        results = await asyncio.gather(
            *(self.fs.check(self._upper(i), lb) for i, lb in remote), return_exceptions=True
        )
        bad = [(i, r) for (i, _), r in zip(remote, results, strict=True) if r is not None]
        for i, err in bad:
            log.warning("layer is unavailable", extra={"mount-point": self._upper(i), "error": err})
        if bad:
            raise Unavailable(f"layer {q(str(sid))} unavailable")

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        """The mounts containerd's overlay snapshotter would return for ``snap``."""
        if not snap.parent_ids:
            flag = "ro" if snap.kind == Kind.VIEW else "rw"
            return [Mount("bind", self._upper(snap.id), (flag, "rbind"))]
        options = []
        if self._index_off:
            options.append("index=off")
        if self._userxattr:
            options.append("userxattr")
        if snap.kind == Kind.ACTIVE:
            options += [f"workdir={self._work(snap.id)}", f"upperdir={self._upper(snap.id)}"]
        elif len(snap.parent_ids) == 1:
            return [Mount("bind", self._upper(snap.parent_ids[0]), ("ro", "rbind"))]
        options.append("lowerdir=" + ":".join(self._upper(i) for i in snap.parent_ids))
        return [Mount("overlay", "overlay", tuple(options))]

    def _orphan_dirs(self, tx: Tx) -> list[str]:
        owned = {str(i) for i in tx.ids()}
        with os.scandir(self.snapshots_dir) as entries:
            names = sorted(e.name for e in entries)
        return [os.path.join(self.snapshots_dir, n) for n in names if n not in owned]

    def _remote_snapshots(self) -> list[tuple[int, Info]]:
        with self._tx(False) as tx:
            out = []
            for info in tx.walk():
                if REMOTE_LABEL in info.labels:
                    sid, _, _ = tx.get_info(info.name)
                    out.append((sid, info))
            return out

    async def _remove_dir(self, path: str) -> None:
        if self.fs is not None:
            try:
                await self.fs.unmount(os.path.join(path, "fs"))
            except Exception as e:  # maybe never mounted; checked next
                log.debug("failed to unmount", extra={"dir": path, "error": e})
        try:
            await asyncio.to_thread(self._remove_dir_sync, path)
        except OSError as e:
            # The row is gone already; Cleanup will try again.
            log.warning("failed to remove directory", extra={"path": path, "error": e})

    def _remove_dir_sync(self, path: str) -> None:
        # Never delete through a mount: that would delete files of whatever is mounted.
        still = osutil.unmount_all_under(path)
        if still:
            raise OSError(f"{path}: still mounted at {', '.join(still)}")
        osutil.remove_tree(path)

    async def _restore(self) -> None:
        """After a restart: drop stale mounts, then mount every remote snapshot again.

        When the filesystem took over the previous daemon's live FUSE connection
        (``connection_kept``), the remote snapshots' bind mounts are still valid and in use
        by running containers (as overlayfs lower dirs): they stay, and ``mount`` only
        registers them again.
        """
        if not getattr(self.fs, "connection_kept", False):
            still = await asyncio.to_thread(osutil.unmount_all_under, self.snapshots_dir)
            for mp in still:
                log.warning("cannot unmount stale mount", extra={"mount-point": mp})
        for sid, info in await self._db(self._remote_snapshots):
            fields = {"key": info.name, "id": sid}
            try:
                if self.fs is None:
                    raise Unavailable("no remote filesystem configured")
                await self.fs.mount(self._upper(sid), info.labels)
            except Exception as e:
                if not self.allow_invalid_mounts_on_restart:
                    raise Unavailable(
                        f"failed to restore remote snapshot {q(info.name)}: {e}"
                    ) from e
                log.warning(
                    "failed to restore remote snapshot; remove this snapshot manually",
                    extra={**fields, "error": e},
                )
