"""Chunk caches: a bounded in-memory LRU in front of a content-addressed directory cache.

Both hold *decompressed, verified* chunks. A chunk's key is its ``chunkDigest`` (hex), so
equal chunks of different layers or images are fetched and stored once, and a daemon that
restarts finds what it fetched before. Chunks of layers mounted without verification
(no digest in the TOC) get a key derived from the layer digest and chunk row instead;
they are never shared.

The directory cache (``<root>/cache``)::

    chunks/<k[:2]>/<k>   one file per chunk, exactly its decompressed bytes
    merged/<name>        whole-file copies of multi-chunk files for FUSE passthrough
                         (key ``m-<name>``, see `stargz.fs.passthrough`)
    layers/<hex>         the tail of a blob (footer + TOC), so a restart needs no TOC fetch
    tmp/                 writes in progress; renamed into place when complete, and
                         emptied at start (a crash leaves nothing half-written in chunks/)

It is bounded in bytes (``max_bytes``; 0 = unbounded): past the bound, the least recently
used files (chunks and merged files alike) are deleted. A file counts as the whole
filesystem blocks it takes (the daemon's cache probes the block size), so a cache of tiny
chunks is bounded in disk space too. Recency is kept in memory; at start the order is
rebuilt from the files' mtimes.

Checksums. Every chunk and merged file carries the xxh3-128 of its bytes in the xattr
``user.stargz.xxh3``, set on the temporary file before it is renamed into place: the
record belongs to that inode from its first visible moment and is never rewritten, so it
can only ever describe the bytes that write meant the file to hold. A torn write (power
lost before the data reached the disk), disk rot or a stray write make the bytes differ
from it, never the record from the name. Chunk files must stay byte-for-byte their chunk
(they back passthrough opens as they are), hence an xattr rather than a header. On a
filesystem without user xattrs (`xattrs` is False after `load`) nothing is recorded and a
chunk found at start is re-hashed with sha256 instead. A blob tail has the checksum in
its own header.

A file is trusted only once it has been checked in this process: one written by this
process is; one found at start is checked on first use (`read_checked`; for chunks the
layer does that, see ``Fetcher.start_disk_verify``). A file whose bytes do not match is
deleted and counted in ``FsMetrics.cache_checksum_failures``.

Threads: ``write_file``, ``write_tmp``, ``read_file``, ``pread_fresh`` and ``load`` may run
in worker threads; ``pread`` (cached fds) and everything that changes the index (``commit``,
``discard``, eviction) run on the event loop thread. Files written while the daemon runs
wait in tmp/ until their commit, which evicts to make room and only then renames them into
place: what chunks/ and merged/ hold never passes the bound (tmp/ holds the writes in
flight, at most the writer's backlog).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import errno
import logging
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable, Sequence

import xxhash

from stargz.fs.metrics import FsMetrics
from stargz.private import DIR_MODE, FILE_MODE, private_dir

log = logging.getLogger("stargz.fs")

MIN_OPEN_FDS = 128
#: The xattr holding a cache file's xxh3-128 (16 bytes, big-endian digest).
XATTR = "user.stargz.xxh3"
#: Key prefix of merged passthrough files (chunk keys are hex digests or ``u-...``).
MERGED_PREFIX = "m-"
_TAIL_MAGIC_V1 = b"STGZTAIL"  # no checksum (written before checksums were recorded)
_TAIL_MAGIC = b"STGZTAL2"
_TAIL_HEAD_V1 = struct.Struct("<8sQQ")  # magic, start offset, blob size
_TAIL_HEAD = struct.Struct("<8sQQ16s")  # magic, start offset, blob size, xxh3-128 of the rest
_NO_XATTR = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM)


def checksum(data: bytes | memoryview) -> bytes:
    """xxh3-128 of ``data``: ~60 GB/s here, against sha256's ~1.8 (no crypto needed: the
    record guards against damage, not against someone who can write the cache dir)."""
    return xxhash.xxh3_128_digest(data)


#: `read_checked`'s verdicts.
CHECK_OK, CHECK_BAD, CHECK_NO_RECORD = "ok", "bad", "no-record"


class MemoryLRU:
    """Decompressed chunks by key, bounded by total bytes (oldest dropped first)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, max_bytes)
        self.bytes = 0
        self._d: collections.OrderedDict[str, bytes] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: str) -> bool:
        return key in self._d

    def get(self, key: str) -> bytes | None:
        data = self._d.get(key)
        if data is not None:
            self._d.move_to_end(key)
        return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        old = self._d.pop(key, None)
        if old is not None:
            self.bytes -= len(old)
        self._d[key] = data
        self.bytes += len(data)
        while self.bytes > self.max_bytes:
            _, dropped = self._d.popitem(last=False)
            self.bytes -= len(dropped)

    def discard(self, key: str) -> None:
        old = self._d.pop(key, None)
        if old is not None:
            self.bytes -= len(old)

    def clear(self) -> None:
        self._d.clear()
        self.bytes = 0


class DiskCache:
    """Content-addressed chunk files under ``root``, bounded by ``max_bytes`` (0 = no bound)."""

    def __init__(
        self,
        root: str,
        max_bytes: int = 0,
        max_fds: int = 16,
        metrics: FsMetrics | None = None,
        block: int | None = 1,
    ) -> None:
        self.root = root
        self.max_bytes = max(0, max_bytes)
        #: Files are counted in whole blocks of this size, what they take on disk (a
        #: 100-byte chunk file takes a 4 KiB block: counted by its length, a cache of tiny
        #: chunks used 13x its bound of disk space). None: the cache filesystem's block
        #: size, probed by `load`; 1: file lengths.
        self.block = block
        # open fds are cheap and a random read over a big file touches many chunk files:
        # Go's default of 10 would make nearly every read reopen its file
        self.max_fds = max(MIN_OPEN_FDS, max_fds)
        self.metrics = metrics or FsMetrics()
        self.bytes = 0
        #: Bumped whenever a chunk leaves the cache (eviction, damage): "fully cached"
        #: answers computed before a change of generation must be recomputed.
        self.generation = 0
        #: Bumped by every `commit`: with ``generation``, tells a layer's fetched-size
        #: counter whether chunks came or went since it last looked.
        self.commits = 0
        self._index: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._verified: set[str] = set()
        self._fds: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._fd_lock = threading.Lock()
        #: Temporary files that could not be deleted when their write or placing failed
        #: (a cache dir gone read-only): deleted once a later write succeeds.
        self._orphans: set[str] = set()
        self._orphans_lock = threading.Lock()
        self._orphan_retry: asyncio.TimerHandle | None = None
        self._chunks = os.path.join(root, "chunks")
        self._merged = os.path.join(root, "merged")
        self._layers = os.path.join(root, "layers")
        self._tmp = os.path.join(root, "tmp")
        #: Whether the cache dir's filesystem keeps user xattrs (probed by `load`); without
        #: them no checksum is recorded and chunks found at start are re-hashed (sha256).
        self.xattrs = True
        #: Called on the event loop thread with the key of every file that leaves the
        #: index (eviction, damage): passthrough lets go of the backing files it held.
        self.on_discard: Callable[[str], None] | None = None
        self._logged_damage = False
        #: Keys whose files a worker is renaming into place (`commit_later`), with their
        #: sizes: counted in ``bytes`` already, not in the index until they are there.
        self._placing: dict[str, int] = {}
        self._placer: concurrent.futures.ThreadPoolExecutor | None = None

    # --- start -------------------------------------------------------------------------

    def load(self) -> None:
        """Create the directories, clear tmp/, probe xattr support, and index every chunk
        and merged file (blocking)."""
        for d in (self.root, self._chunks, self._merged, self._layers, self._tmp):
            private_dir(d)
        for e in os.scandir(self._tmp):
            try:
                os.unlink(e.path)
            except OSError:
                pass
        if self.block is None:
            try:
                self.block = max(1, os.statvfs(self.root).f_frsize)
            except OSError:
                self.block = 4096
        self.xattrs = self._probe_xattrs()
        if not self.xattrs:
            log.warning(
                "the disk cache's filesystem keeps no user xattrs: cache files carry no "
                "checksum, chunks found at start are re-hashed (sha256) and merged "
                "passthrough files are not kept across restarts",
                extra={"dir": self.root},
            )
        found: list[tuple[int, str, int]] = []
        for shard in os.scandir(self._chunks):
            if not shard.is_dir(follow_symlinks=False):
                continue
            for f in os.scandir(shard.path):
                try:
                    st = f.stat(follow_symlinks=False)
                except OSError:
                    continue
                found.append((st.st_mtime_ns, f.name, st.st_size))
        for f in os.scandir(self._merged):
            if not self.xattrs:  # nothing could vouch for it
                _unlink(f.path)
                continue
            try:
                st = f.stat(follow_symlinks=False)
            except OSError:
                continue
            found.append((st.st_mtime_ns, MERGED_PREFIX + f.name, st.st_size))
        found.sort()
        self._index.clear()
        self.bytes = 0
        for _, name, size in found:
            self._index[name] = size
            self.bytes += self.cost(size)
        self._evict()

    def close(self) -> None:
        if self._placer is not None:
            self._placer.shutdown(wait=True)
            self._placer = None
        if self._orphan_retry is not None:
            self._orphan_retry.cancel()
            self._orphan_retry = None
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    # --- index (event loop thread) -----------------------------------------------------

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def size_of(self, key: str) -> int | None:
        return self._index.get(key)

    def is_verified(self, key: str) -> bool:
        return key in self._verified

    def mark_verified(self, key: str) -> None:
        self._verified.add(key)

    def touch(self, key: str) -> None:
        if key in self._index:
            self._index.move_to_end(key)

    def commit(self, key: str, size: int, tmp: str | None = None) -> bool:
        """Record a chunk file (and trust it); whether it is now in the cache.

        With ``tmp`` (a finished file from `write_tmp`), room is made first and the file is
        then renamed into place: the files under chunks/ and merged/ never add up to more
        than ``max_bytes``, even for a moment (a file placed by a worker thread before its
        commit was on disk, uncounted, until the commit evicted for it). The rename
        blocks: on the event loop thread, use `commit_later`. A file bigger than the whole
        bound is not kept. Without ``tmp``, the file is already in place (`write_file`)."""
        if tmp is not None:
            admitted = self._admit(key, size, tmp)
            if admitted is not None:
                return admitted
            try:
                self.place(tmp, key)
            except OSError as e:
                self._drop_tmp(tmp)
                log.warning("cannot place a file in the disk cache: %s", e)
                self._retry_orphans_later(0.2)
                return False
        old = self._index.pop(key, None)
        if old is not None:
            self.bytes -= self.cost(old)
        self._index[key] = size
        self.bytes += self.cost(size)
        self._verified.add(key)
        self.commits += 1
        self._evict(keep=key)
        return True

    def commit_later(
        self, files: Sequence[tuple[str, int, str]], done: Callable[[list[bool]], None]
    ) -> None:
        """`commit` of finished temporary files ``(key, size, tmp)``, with the renames on a
        worker thread; ``done`` gets, on the loop, whether each file is now in the cache.

        Why not on the loop thread: a rename from tmp/ to another directory takes the
        filesystem's rename lock, and an overlayfs copy-up in a container holds that lock
        (its upper dir is on the same filesystem, under the snapshots) while it waits for
        this daemon to answer a FUSE request. A loop blocked in rename() never answers:
        both wait forever, and every rename on that filesystem with them. The bound holds
        as in `commit`: room is made and the bytes counted before a file is placed."""
        results: list[bool | None] = []
        todo: list[tuple[int, str, int, str]] = []
        for i, (key, size, tmp) in enumerate(files):
            admitted = self._admit(key, size, tmp)
            results.append(admitted)
            if admitted is None:
                self._placing[key] = size
                self.bytes += self.cost(size)
                todo.append((i, key, size, tmp))
        if not todo:
            done([bool(r) for r in results])
            return
        if self._placer is None:
            self._placer = concurrent.futures.ThreadPoolExecutor(1, "stargz-cache-place")
        fut = asyncio.get_running_loop().run_in_executor(self._placer, self._place_all, todo)

        def placed(f: asyncio.Future[list[Exception | None]]) -> None:
            errors = [None] * len(todo) if f.cancelled() else f.result()
            for (i, key, size, tmp), err in zip(todo, errors, strict=True):
                self._placing.pop(key, None)
                self.bytes -= self.cost(size)
                if err is not None or f.cancelled():
                    self._drop_tmp(tmp)
                    log.warning("cannot place a file in the disk cache: %s", err)
                    self._retry_orphans_later(0.2)
                    results[i] = False
                else:
                    results[i] = self.commit(key, size)
            done([bool(r) for r in results])

        fut.add_done_callback(placed)

    def _admit(self, key: str, size: int, tmp: str) -> bool | None:
        """Make room for the finished temporary file ``tmp`` of ``key``: None when there is
        room and it is to be placed; True when the content is cached already (another
        layer's), False when it is not kept (bigger than the bound, or the room is held by
        files still being placed); ``tmp`` is deleted in both cases."""
        if key in self._index or key in self._placing:
            self._drop_tmp(tmp)
            self.touch(key)
            return True
        if self.max_bytes and self.cost(size) > self.max_bytes:
            self._drop_tmp(tmp)
            return False
        self._evict(incoming=self.cost(size))
        if self.max_bytes and self.bytes + self.cost(size) > self.max_bytes:
            self._drop_tmp(tmp)
            return False
        return None

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until the files `commit_later` is placing are placed and committed."""
        await asyncio.sleep(0)  # the write jobs' done callbacks hand theirs over first
        deadline = time.monotonic() + timeout
        while self._placing and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    def _place_all(self, todo: list[tuple[int, str, int, str]]) -> list[Exception | None]:
        out: list[Exception | None] = []
        for _, key, _, tmp in todo:
            try:
                self.place(tmp, key)
                out.append(None)
            except Exception as e:  # each file's own outcome; the reservation is undone
                out.append(e)
        return out

    def discard(self, key: str) -> None:
        """Forget a file and delete it (it is damaged, or being evicted)."""
        size = self._index.pop(key, None)
        if size is not None:
            self.bytes -= self.cost(size)
            self.generation += 1
        self._verified.discard(key)
        with self._fd_lock:
            fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)
        _unlink(self.path(key))
        if size is not None and self.on_discard is not None:
            self.on_discard(key)

    def damaged(self, key: str, what: str) -> None:
        """``key``'s file did not match its checksum: count it, say so once, delete it."""
        self.metrics.cache_checksum_failures += 1
        if not self._logged_damage:
            self._logged_damage = True
            log.warning(
                "a disk cache file does not match its checksum (torn write, disk damage or a "
                "stray write); it is deleted and fetched again. Further ones are only counted "
                "(stargz_fs_cache_checksum_failures_total)",
                extra={"file": self.path(key), "kind": what},
            )
        else:
            log.debug("damaged disk cache file %s (%s)", self.path(key), what)
        self.discard(key)

    def cost(self, size: int) -> int:
        """What a file of ``size`` bytes counts against the bound: its whole blocks."""
        b = self.block or 1
        return -(-size // b) * b

    def _evict(self, keep: str | None = None, incoming: int = 0) -> None:
        """Delete least recently used files until the index (plus ``incoming`` bytes about
        to be placed) fits the bound."""
        if not self.max_bytes:
            return
        while self.bytes + incoming > self.max_bytes and self._index:
            key = next(iter(self._index))
            if key == keep:
                if len(self._index) == 1:
                    return
                self._index.move_to_end(key)
                continue
            size = self._index[key]
            self.discard(key)
            self.metrics.disk_evictions += 1
            self.metrics.disk_evicted_bytes += size

    # --- files (any thread) --------------------------------------------------------------

    def _drop_tmp(self, tmp: str) -> None:
        """Delete a temporary file; one that can't be deleted now is retried later."""
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        except OSError:
            with self._orphans_lock:
                self._orphans.add(tmp)

    def _retry_orphans(self) -> None:
        with self._orphans_lock:
            left = list(self._orphans)
            self._orphans.clear()
        for tmp in left:
            self._drop_tmp(tmp)

    def _retry_orphans_later(self, delay: float) -> None:
        """On the loop thread: keep trying to delete orphans (a read-only cache dir may come
        back while nothing is written), backing off to a minute."""
        if not self._orphans or self._orphan_retry is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        def tick() -> None:
            self._orphan_retry = None
            self._retry_orphans()
            self._retry_orphans_later(min(delay * 2, 60.0))

        self._orphan_retry = loop.call_later(delay, tick)

    def path(self, key: str) -> str:
        if key.startswith(MERGED_PREFIX):
            return os.path.join(self._merged, key[len(MERGED_PREFIX) :])
        return os.path.join(self._chunks, key[:2], key)

    def _probe_xattrs(self) -> bool:
        probe = os.path.join(self._tmp, f"xattr-probe.{uuid.uuid4().hex}")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        except OSError:
            return False
        try:
            os.setxattr(fd, XATTR, checksum(b""))
            return os.getxattr(fd, XATTR) == checksum(b"")
        except OSError:
            return False
        finally:
            os.close(fd)
            _unlink(probe)

    def tmp_path(self, name: str) -> str:
        """A fresh path in tmp/ (emptied at start) for a file being written."""
        return os.path.join(self._tmp, f"{name}.{uuid.uuid4().hex}")

    def record(self, fd: int, digest: bytes) -> None:
        """Set a file's checksum record (before it is renamed into place). Blocking."""
        if not self.xattrs:
            return
        try:
            os.setxattr(fd, XATTR, digest)
        except OSError as e:
            if e.errno not in _NO_XATTR:
                raise
            self.xattrs = False
            log.warning("the disk cache's filesystem refused a user xattr: no checksums")

    def place(self, tmp: str, key: str) -> None:
        """Move a finished temporary file to ``key``'s path. Blocking.

        Link + unlink, not rename: a rename from tmp/ to another directory takes the
        filesystem's rename lock, which an overlayfs copy-up on this filesystem (a container
        writing under a directory of a lazily mounted layer) holds while it waits for a FUSE
        answer from the loop thread. Link and unlink lock only their own directories; and
        the fetch path calls this on a worker thread anyway (`commit_later`)."""
        final = self.path(key)
        try:
            _link_over(tmp, final)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(final), DIR_MODE, exist_ok=True)
            _link_over(tmp, final)
        os.unlink(tmp)

    def write_file(self, key: str, data: bytes | memoryview, *, sync: bool = False) -> int:
        """Write a chunk to tmp/, record its checksum, rename it into place; returns its
        size. Blocking. (The fetch path uses `write_tmp` and ``commit(..., tmp)``, which
        keep the bound while it writes.)"""
        tmp = self.write_tmp(key, data, sync=sync)
        try:
            self.place(tmp, key)
        except BaseException:
            self._drop_tmp(tmp)
            raise
        return len(data)

    def write_tmp(self, key: str, data: bytes | memoryview, *, sync: bool = False) -> str:
        """Write a chunk to a new file in tmp/ with its checksum recorded; returns its path,
        for ``commit(key, size, tmp)``. Blocking."""
        tmp = self.tmp_path(key)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            try:
                view = memoryview(data)
                self.record(fd, checksum(view))
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            self._drop_tmp(tmp)  # a full disk must not fill up further with halves
            raise
        if self._orphans:  # the cache dir takes writes again
            self._retry_orphans()
        return tmp

    def add_record(self, key: str, data: bytes) -> None:
        """Record the checksum of a file written without one, whose ``data`` was just
        checked another way (sha256 against its digest), so the next start checks it
        cheaply. Best effort; blocking."""
        if not self.xattrs:
            return
        try:
            os.setxattr(self.path(key), XATTR, checksum(data))
        except OSError:
            pass

    def read_checked(self, key: str, *, want: bool = True) -> tuple[str, bytes | None]:
        """``(verdict, bytes)`` of a file found at start: CHECK_OK (its bytes match its
        checksum record), CHECK_BAD (they do not; bytes None) or CHECK_NO_RECORD (none to
        check against: the caller decides). With ``want`` False the bytes are not kept.
        OSError if the file is gone. Blocking."""
        fd = os.open(self.path(key), os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                rec = os.getxattr(fd, XATTR)
            except OSError as e:
                if e.errno not in (errno.ENODATA, *_NO_XATTR):
                    raise
                rec = None
            if rec is None:
                if not want:
                    return CHECK_NO_RECORD, None
                return CHECK_NO_RECORD, _read_all(fd)
            if want:
                data = _read_all(fd)
                return (CHECK_OK, data) if checksum(data) == rec else (CHECK_BAD, None)
            h = xxhash.xxh3_128()
            off = 0
            while True:  # (a merged file may be big: hashed in pieces, never held whole)
                piece = os.pread(fd, 8 << 20, off)
                if not piece:
                    break
                h.update(piece)
                off += len(piece)
            return (CHECK_OK, None) if h.digest() == rec else (CHECK_BAD, None)
        finally:
            os.close(fd)

    def _fd(self, key: str) -> int:
        with self._fd_lock:
            fd = self._fds.get(key)
            if fd is not None:
                self._fds.move_to_end(key)
                return fd
        fd = os.open(self.path(key), os.O_RDONLY | os.O_CLOEXEC)
        with self._fd_lock:
            other = self._fds.get(key)
            if other is not None:  # another thread opened it meanwhile
                os.close(fd)
                return other
            self._fds[key] = fd
            while len(self._fds) > self.max_fds:
                _, old = self._fds.popitem(last=False)
                os.close(old)
        return fd

    def fd(self, key: str) -> int:
        """An open fd of ``key``'s file (event loop thread; good until the loop next runs
        something that may evict or discard, so use it at once); OSError if it is gone."""
        return self._fd(key)

    def pread(self, key: str, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of a chunk file; OSError if it is gone."""
        try:
            return os.pread(self._fd(key), size, offset)
        except OSError:
            # the fd may have been closed by a concurrent eviction: retry once with a new one
            with self._fd_lock:
                fd = self._fds.pop(key, None)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
            return os.pread(self._fd(key), size, offset)

    def willneed(self, key: str) -> None:
        """Have the kernel start reading a chunk file into the page cache (no wait)."""
        try:
            os.posix_fadvise(self._fd(key), 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass

    def pread_fresh(self, key: str, offset: int, size: int) -> bytes:
        """`pread` through a new fd: for worker threads, which must not use the cached fds
        (the loop thread may close one at any time, and its number be reused)."""
        fd = os.open(self.path(key), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def read_file(self, key: str) -> bytes:
        with open(self.path(key), "rb") as f:
            return f.read()

    # --- blob tails ----------------------------------------------------------------------

    def _tail_path(self, digest: str) -> str:
        return os.path.join(self._layers, digest.replace(":", "-"))

    def read_tail(self, digest: str, blob_size: int) -> tuple[int, bytes] | None:
        """``(start, bytes[start:blob_size])`` of a blob stored by `write_tail`, or None.

        A tail whose bytes do not match the checksum in its header is deleted (and
        counted): the caller fetches it again. Blocking.
        """
        path = self._tail_path(digest)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError:
            return None
        if raw[:8] == _TAIL_MAGIC_V1 and len(raw) >= _TAIL_HEAD_V1.size:
            # written before tails had a checksum: the TOC digest (when verifying) checks it
            _, start, size = _TAIL_HEAD_V1.unpack_from(raw)
            head, rec = _TAIL_HEAD_V1.size, None
        elif raw[:8] == _TAIL_MAGIC and len(raw) >= _TAIL_HEAD.size:
            _, start, size, rec = _TAIL_HEAD.unpack_from(raw)
            head = _TAIL_HEAD.size
        else:
            rec = b""  # damaged beyond its magic
            head, start, size = 0, 0, 0
        if rec is not None and (rec == b"" or checksum(memoryview(raw)[head:]) != rec):
            self.metrics.cache_checksum_failures += 1
            log.warning(
                "dropping a damaged cached TOC (checksum mismatch); fetching it again",
                extra={"layer": digest, "file": path},
            )
            _unlink(path)
            return None
        if size != blob_size or len(raw) - head != size - start:
            return None
        return start, raw[head:]

    def write_tail(self, digest: str, start: int, blob_size: int, data: bytes) -> None:
        tmp = self.tmp_path("tail")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            with open(fd, "wb") as f:
                f.write(_TAIL_HEAD.pack(_TAIL_MAGIC, start, blob_size, checksum(data)))
                f.write(data)
            os.rename(tmp, self._tail_path(digest))
        except BaseException:
            self._drop_tmp(tmp)
            raise


def _link_over(src: str, dst: str) -> None:
    """Hard-link ``src`` as ``dst``, replacing a file left there."""
    try:
        os.link(src, dst)
    except FileExistsError:
        os.unlink(dst)
        os.link(src, dst)


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0)
    while len(data) < size:  # (pread may return less for big files)
        more = os.pread(fd, size - len(data), len(data))
        if not more:
            break
        data += more
    return data


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
