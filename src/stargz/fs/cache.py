"""Chunk caches: a bounded in-memory LRU in front of a content-addressed directory cache.

Both hold *decompressed, verified* chunks. A chunk's key is its ``chunkDigest`` (hex), so
equal chunks of different layers or images are fetched and stored once, and a daemon that
restarts finds what it fetched before. Chunks of layers mounted without verification
(no digest in the TOC) get a key derived from the layer digest and chunk row instead;
they are never shared.

The directory cache (``<root>/cache``)::

    chunks/<k[:2]>/<k>   one file per chunk, exactly its decompressed bytes
    layers/<hex>         the tail of a blob (footer + TOC), so a restart needs no TOC fetch
    tmp/                 writes in progress; renamed into place when complete, and
                         emptied at start (a crash leaves nothing half-written in chunks/)

It is bounded in bytes (``max_bytes``; 0 = unbounded): past the bound, the least recently
used chunks are deleted. Recency is kept in memory; at start the order is rebuilt from
the files' mtimes. A file is trusted only once it has been checked in this process: a
chunk written by this process is, one found at start is re-hashed against its name on
first use (the layer does that, see ``Fetcher.start_disk_verify``).

Threads: ``write_file``, ``read_file``, ``pread_fresh`` and ``load`` may run in worker
threads; ``pread`` (cached fds) and everything that changes the index (``commit``,
``discard``, eviction) run on the event loop thread.
"""

from __future__ import annotations

import collections
import os
import struct
import threading
import uuid

from stargz.fs.metrics import FsMetrics
from stargz.private import DIR_MODE, FILE_MODE, private_dir

MIN_OPEN_FDS = 128
_TAIL_MAGIC = b"STGZTAIL"
_TAIL_HEAD = struct.Struct("<8sQQ")  # magic, start offset, blob size


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
        self, root: str, max_bytes: int = 0, max_fds: int = 16, metrics: FsMetrics | None = None
    ) -> None:
        self.root = root
        self.max_bytes = max(0, max_bytes)
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
        self._chunks = os.path.join(root, "chunks")
        self._layers = os.path.join(root, "layers")
        self._tmp = os.path.join(root, "tmp")

    # --- start -------------------------------------------------------------------------

    def load(self) -> None:
        """Create the directories, clear tmp/, and index every chunk file (blocking)."""
        for d in (self.root, self._chunks, self._layers, self._tmp):
            private_dir(d)
        for e in os.scandir(self._tmp):
            try:
                os.unlink(e.path)
            except OSError:
                pass
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
        found.sort()
        self._index.clear()
        self.bytes = 0
        for _, name, size in found:
            self._index[name] = size
            self.bytes += size
        self._evict()

    def close(self) -> None:
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

    def commit(self, key: str, size: int) -> None:
        """Record a chunk file that `write_file` put in place (and trust it)."""
        old = self._index.pop(key, None)
        if old is not None:
            self.bytes -= old
        self._index[key] = size
        self.bytes += size
        self._verified.add(key)
        self.commits += 1
        self._evict(keep=key)

    def discard(self, key: str) -> None:
        """Forget a chunk and delete its file (it is damaged, or being evicted)."""
        size = self._index.pop(key, None)
        if size is not None:
            self.bytes -= size
            self.generation += 1
        self._verified.discard(key)
        with self._fd_lock:
            fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(self.path(key))
        except OSError:
            pass

    def _evict(self, keep: str | None = None) -> None:
        if not self.max_bytes:
            return
        while self.bytes > self.max_bytes and self._index:
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

    def path(self, key: str) -> str:
        return os.path.join(self._chunks, key[:2], key)

    def write_file(self, key: str, data: bytes | memoryview, *, sync: bool = False) -> int:
        """Write a chunk to tmp/ and rename it into place; returns its size. Blocking."""
        final = self.path(key)
        tmp = os.path.join(self._tmp, f"{key}.{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.rename(tmp, final)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(final), DIR_MODE, exist_ok=True)
                os.rename(tmp, final)
        except BaseException:
            _unlink_quietly(tmp)  # a full disk must not fill up further with halves
            raise
        return len(data)

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
        """``(start, bytes[start:blob_size])`` of a blob stored by `write_tail`, or None."""
        try:
            with open(self._tail_path(digest), "rb") as f:
                raw = f.read()
        except OSError:
            return None
        if len(raw) < _TAIL_HEAD.size:
            return None
        magic, start, size = _TAIL_HEAD.unpack_from(raw)
        if magic != _TAIL_MAGIC or size != blob_size or len(raw) - _TAIL_HEAD.size != size - start:
            return None
        return start, raw[_TAIL_HEAD.size :]

    def write_tail(self, digest: str, start: int, blob_size: int, data: bytes) -> None:
        tmp = os.path.join(self._tmp, f"tail.{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            with open(fd, "wb") as f:
                f.write(_TAIL_HEAD.pack(_TAIL_MAGIC, start, blob_size))
                f.write(data)
            os.rename(tmp, self._tail_path(digest))
        except BaseException:
            _unlink_quietly(tmp)
            raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
