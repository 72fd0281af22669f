"""FUSE passthrough (``[fuse] passthrough = true``): which files the kernel reads itself.

A file qualifies once every byte of it is in the disk cache and checked in this process:

- a file that is one whole chunk (most files of an image) is, byte for byte, that
  chunk's cache file: it is registered as the backing file as it is (a chunk file found
  at start is checked by the read path first, so the first open after a start is served
  by the daemon);
- a file of several chunks is merged into one disk cache file (``merged/``, key
  `ChunkIndex.merged_key`: layer digest + node) after a read of it ended (a RELEASE)
  with all its chunks cached, in the cache-writer thread, with its xxh3 recorded; the
  next open passes through. Merged files are the files a workload actually read. They
  are cache files like chunks: kept across unmounts and restarts, counted in the cache's
  byte bound and evicted with its LRU. One found at start is checked against its xxh3 (in
  the cache-writer thread, started by the first open, which the daemon serves) before it
  backs an open; a damaged one is deleted and counted, and made again later.

The kernel refuses to mix modes on one inode (a passthrough open while a cached open of
the same inode lasts, or the reverse, fails with EIO), so a node switches to passthrough
only while no cached open of it is outstanding, and stays so while its backing lives.
When the cache drops a file that backs a node (eviction, damage), the node is served by
the daemon again once its passthrough opens are all closed: until then, further opens
keep the backing id (the kernel holds the deleted file's bytes, which were checked).

Backing ids belong to the FUSE connection, not to the daemon: when a daemon takes a kept
connection over (`stargz.fuse.handover`), the ids the previous one registered are still
there, and so may be open files using them and cached opens the new daemon never saw.
The kernel refuses a second, different backing for an inode that has one (EBUSY) and
mixing modes on an inode (both: the open fails with EIO). So every id is appended to
``ids_path`` (``slot node id`` lines) when registered, and a daemon that took over
(``inherited``) passes through only the nodes listed there, with their old ids, and
serves every other node itself. The old ids stay registered until their layer is
unmounted or the connection ends.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import xxhash

from stargz.fs.cache import CHECK_BAD, CHECK_OK, XATTR, DiskCache, checksum
from stargz.private import FILE_MODE

log = logging.getLogger("stargz.fs")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]


class Passthrough:
    """Backing files for the nodes of mounted layers (one instance per FUSE session).

    ``legacy_dir`` is where earlier versions merged files (named by mount slot, so of no
    use to a new daemon): it is deleted.
    """

    def __init__(
        self,
        legacy_dir: str,
        backing_open: Callable[[int], int],
        backing_close: Callable[[int], None],
        executor: Executor | None,
        disk: DiskCache,
        *,
        ids_path: str | None = None,
        inherited: bool = False,
    ) -> None:
        self._open = backing_open
        self._close = backing_close
        self._executor = executor
        self.disk = disk
        self.enabled = True
        shutil.rmtree(legacy_dir, ignore_errors=True)
        #: backing id -> the cache key of its file; cache key -> the nodes it backs.
        self._key_of: dict[int, str] = {}
        self._users: dict[str, set[tuple[Any, int]]] = {}
        #: Nodes whose backing file left the cache while passthrough opens of them last.
        self._stale: set[tuple[Any, int]] = set()
        self._checking: set[str] = set()
        self._merging: set[str] = set()
        disk.on_discard = self._discarded
        #: After a take-over: (slot, node) -> backing id registered by the previous daemon;
        #: only these nodes pass through (see the module docstring).
        self.inherited: dict[tuple[int, int], int] | None = None
        self._ids_fd = -1
        if ids_path is not None:
            if inherited:
                self.inherited = _read_ids(ids_path)
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
            self._ids_fd = os.open(ids_path, flags | (0 if inherited else os.O_TRUNC), 0o600)

    def close(self) -> None:
        if self._ids_fd >= 0:
            os.close(self._ids_fd)
            self._ids_fd = -1

    # --- the open path (event loop thread) ---------------------------------------------------

    def backing_for(self, m: Any, node: int) -> int:
        """A backing id for ``node`` of mounted layer ``m``, or 0 (serve it ourselves).
        A nonzero answer counts as a passthrough open until `closed`."""
        bid = m.backing.get(node)
        if bid is None and self.inherited is not None:
            bid = self.inherited.pop((m.slot, node), 0)
            if not bid:
                return 0
            m.backing[node] = bid
        elif bid is None:
            if not self.enabled or m.cached_opens.get(node):
                return 0
            bid = self._new_backing(m, node)
            if not bid:
                return 0
        else:
            self.disk.touch(self._key_of.get(bid, ""))
        m.pt_opens[node] = m.pt_opens.get(node, 0) + 1
        return bid

    def _new_backing(self, m: Any, node: int) -> int:
        key = self._backing_key(m.layer, node)
        if key is None:
            return 0
        try:
            fd = os.open(self.disk.path(key), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return 0
        try:
            bid = self._open(fd)
        except OSError as e:
            log.warning(
                "FUSE passthrough refused by the kernel; serving reads from the daemon",
                extra={"error": str(e)},
            )
            self.enabled = False
            return 0
        finally:
            os.close(fd)
        m.backing[node] = bid
        if self._ids_fd >= 0:
            try:
                os.write(self._ids_fd, f"{m.slot} {node} {bid}\n".encode())
            except OSError as e:
                log.warning("cannot record a passthrough backing id: %s", e)
        self._key_of[bid] = key
        self._users.setdefault(key, set()).add((m, node))
        self.disk.touch(key)
        return bid

    def _backing_key(self, layer: Any, node: int) -> str | None:
        """The cache key of a checked file holding exactly ``node``'s bytes, or None."""
        lo, hi = layer.chunks.span(node)
        if hi - lo == 1:
            files = layer.chunk_files(node)
            return layer.index.keys[lo] if files else None
        if hi - lo < 2:
            return None
        key = layer.index.merged_key(node)
        disk = self.disk
        if key not in disk:
            return None
        if not disk.is_verified(key):
            self._check(key)  # (found at start: this open is served by the daemon)
            return None
        return key

    def closed(self, m: Any, node: int) -> None:
        """A passthrough open of ``node`` ended."""
        left = m.pt_opens.get(node, 0) - 1
        if left > 0:
            m.pt_opens[node] = left
            return
        m.pt_opens.pop(node, None)
        if (m, node) in self._stale:
            self._stale.discard((m, node))
            self._unback(m, node)

    def released(self, m: Any, node: int) -> None:
        """A cached open of ``node`` ended: merge the file if it is now wholly cached."""
        if not self.enabled or self._executor is None or m.layer.closed:
            return
        layer = m.layer
        lo, hi = layer.chunks.span(node)
        if hi - lo < 2:
            return
        key = layer.index.merged_key(node)
        if key in self.disk or key in self._merging:
            return
        files = layer.chunk_files(node)
        if not files:
            return
        self._merging.add(key)
        disk = self.disk
        parts = [(f.path, f.size) for f in files]
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executor, _merge, parts, disk, key)

        def done(f: asyncio.Future[tuple[str, int] | None]) -> None:
            self._merging.discard(key)
            got = None if f.cancelled() or f.exception() is not None else f.result()
            if got is not None:
                tmp, size = got
                disk.commit_later([(key, size, tmp)], lambda ok: None)

        fut.add_done_callback(done)

    def drop(self, m: Any) -> None:
        """Layer ``m`` is unmounted: close its backing ids (its merged files stay cached)."""
        for node, bid in m.backing.items():
            self._close(bid)  # open files keep their own reference
            key = self._key_of.pop(bid, None)
            users = self._users.get(key) if key is not None else None
            if users is not None:
                users.discard((m, node))
                if not users:
                    del self._users[key]
            self._stale.discard((m, node))
        m.backing.clear()

    # --- the cache's side (event loop thread) ------------------------------------------------

    def _check(self, key: str) -> None:
        """Check a merged file found at start against its xxh3 (in the writer thread)."""
        if key in self._checking or self._executor is None:
            return
        self._checking.add(key)
        disk = self.disk
        fut = asyncio.get_running_loop().run_in_executor(self._executor, _check_file, disk, key)

        def done(f: asyncio.Future[str | None]) -> None:
            self._checking.discard(key)
            verdict = None if f.cancelled() or f.exception() is not None else f.result()
            if key not in disk or disk.is_verified(key):  # (gone, or merged anew meanwhile)
                return
            if verdict == CHECK_OK:
                disk.mark_verified(key)
            elif verdict == CHECK_BAD:
                disk.damaged(key, "merged passthrough file")
            else:  # no record, or unreadable: nothing vouches for it
                disk.discard(key)

        fut.add_done_callback(done)

    def _discarded(self, key: str) -> None:
        """The cache dropped ``key``'s file: the nodes it backs go back to the daemon
        (at once, or when their last passthrough open closes)."""
        for m, node in self._users.pop(key, ()):
            if m.pt_opens.get(node, 0):
                self._stale.add((m, node))
            else:
                self._unback(m, node)

    def _unback(self, m: Any, node: int) -> None:
        bid = m.backing.pop(node, None)
        if bid is not None:
            self._key_of.pop(bid, None)
            self._close(bid)


def _read_ids(path: str) -> dict[tuple[int, int], int]:
    out: dict[tuple[int, int], int] = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and all(x.isdigit() for x in parts):
                    out[(int(parts[0]), int(parts[1]))] = int(parts[2])
    except OSError:
        pass
    return out


def _check_file(disk: DiskCache, key: str) -> str | None:
    try:
        return disk.read_checked(key, want=False)[0]
    except OSError:
        return None


def _record_of(fd: int) -> bytes | None:
    try:
        return os.getxattr(fd, XATTR)
    except OSError as e:
        if e.errno == errno.ENODATA:  # (a chunk file written before checksums existed)
            return None
        raise


def _merge(parts: list[tuple[str, int]], disk: DiskCache, key: str) -> tuple[str, int] | None:
    """Concatenate chunk files into a new file in tmp/, its xxh3 recorded; its path and
    size (for ``disk.commit``, which places it within the bound), or None. Each piece is
    checked against its chunk file's own record on the way, so the record describes
    checked bytes. Blocking."""
    tmp = disk.tmp_path("merge")
    total = xxhash.xxh3_128()
    size = 0
    try:
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            for path, n in parts:
                src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    data = os.pread(src, n, 0)
                    if len(data) != n:
                        raise OSError(f"{path} is shorter than {n} bytes")
                    rec = _record_of(src) if disk.xattrs else None
                    if rec is not None and checksum(data) != rec:
                        raise OSError(f"{path} does not match its checksum")
                finally:
                    os.close(src)
                total.update(data)
                view = memoryview(data)
                while view:
                    view = view[os.write(out, view) :]
                size += n
            disk.record(out, total.digest())
        finally:
            os.close(out)
        return tmp, size
    except OSError as e:
        # a chunk evicted meanwhile, a full disk: the file stays served by the daemon
        log.debug("merging %s for passthrough failed: %s", key, e)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# --- turning it on (``[fuse] passthrough``) ---------------------------------------------------


#: statfs(2) f_type of stacking file systems: the kernel refuses a backing file on one
#: (ELOOP), so "auto" does not ask for passthrough in INIT there (asking costs the mount
#: one level of file-system stacking).
_STACKED_FS = {0x794C7630: "overlayfs", 0xF15F: "ecryptfs"}


def init_refusal(mode: bool | str, root: str) -> str | None:
    """Why not to ask for FUSE passthrough in INIT at all (None: ask). Blocking."""
    if mode is False:
        return "[fuse] passthrough = false"
    if mode == "auto":
        kind = _STACKED_FS.get(_fs_type(root))
        if kind is not None:
            return f"{root} is on {kind}: the kernel refuses backing files there"
    return None


def start(
    mode: bool | str,
    session: Any,
    legacy_dir: str,
    executor: Executor | None,
    disk: DiskCache,
    *,
    refused: str | None = None,
    ids_path: str | None = None,
    inherited: bool = False,
) -> Passthrough | None:
    """The session's `Passthrough`, or None where ``mode`` or the kernel rule it out.

    ``mode`` is ``[fuse] passthrough``: "auto" is on exactly where INIT agreed to FUSE
    passthrough and the kernel lets us register a backing file (CAP_SYS_ADMIN in the
    initial user namespace, the cache on a file system that is not itself stacked); True
    is the same, but its absence is a warning. ``refused`` is `init_refusal`'s answer
    when passthrough was not asked for in INIT. Logs the outcome in one line. Blocking.
    """
    shown = "auto" if mode == "auto" else str(bool(mode)).lower()
    if refused is None and mode is False:
        refused = "[fuse] passthrough = false"
    if refused is not None:
        reason = refused
    elif not session.passthrough:
        reason = (
            "the kernel does not offer FUSE passthrough (needs >= 6.9, CONFIG_FUSE_PASSTHROUGH)"
        )
    else:
        pt = Passthrough(
            legacy_dir,
            session.backing_open,
            session.backing_close,
            executor,
            disk,
            ids_path=ids_path,
            inherited=inherited,
        )
        reason = _probe(pt)
        if reason is not None:
            disk.on_discard = None
            pt.close()
        if reason is None:
            log.info("FUSE passthrough on", extra={"mode": shown, "passthrough": True})
            return pt
    log.log(
        logging.WARNING if mode is True else logging.INFO,
        "FUSE passthrough off; reads go through the daemon",
        extra={"mode": shown, "passthrough": False, "reason": reason},
    )
    return None


def _fs_type(path: str) -> int:
    """statfs(2) f_type of the file system holding ``path`` (0 if it can't be read)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return 0
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def _probe(pt: Passthrough) -> str | None:
    """Why the kernel would refuse backing files in the disk cache, or None if it takes one."""
    path = pt.disk.tmp_path("probe")
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE))
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        _unlink(path)
        return f"cannot create {path}: {e.strerror}"
    try:
        bid = pt._open(fd)
    except OSError as e:
        # EPERM: no CAP_SYS_ADMIN in the initial user namespace; ELOOP: the cache is on a
        # stacked file system (overlayfs) deeper than FUSE allows a backing file to be
        return f"the kernel refused a backing file: {e.strerror or e}"
    finally:
        os.close(fd)
        _unlink(path)
    pt._close(bid)
    return None
