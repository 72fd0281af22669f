"""FUSE passthrough (``[fuse] passthrough = true``): which files the kernel reads itself.

A file qualifies once every byte of it is in the disk cache and verified:

- a file that is one whole chunk (most files of an image) is, byte for byte, that
  chunk's cache file: it is registered as the backing file as it is;
- a file of several chunks is merged into one file under ``<root>/passthrough/`` after a
  read of it ended (a RELEASE) with all its chunks cached, in the cache-writer thread;
  the next open passes through. Merged files are the files a workload actually read, so
  they cost disk only for those; they are deleted with their layer and at start-up (a new
  daemon does not trust what it did not verify itself).

The kernel refuses to mix modes on one inode (a passthrough open while a cached open of
the same inode lasts, or the reverse, fails with EIO), so a node switches to passthrough
only while no cached open of it is outstanding, and stays so while its backing lives.

Backing ids belong to the FUSE connection, not to the daemon: when a daemon takes a kept
connection over (`stargz.fuse.handover`), the ids the previous one registered are still
there, and so may be open files using them and cached opens the new daemon never saw.
The kernel also refuses a second, different backing for an inode that has one (EBUSY).
So every id is appended to ``ids_path`` (``slot node id`` lines) when registered, and a
daemon that took over (``inherited``) serves passthrough only for the nodes listed there,
with their old ids, and every other node from the daemon: mixing can't happen. The old
ids stay registered until their layer is unmounted or the connection ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

log = logging.getLogger("stargz.fs")


class Passthrough:
    """Backing files for the nodes of mounted layers (one instance per FUSE session)."""

    def __init__(
        self,
        root: str,
        backing_open: Callable[[int], int],
        backing_close: Callable[[int], None],
        executor: Executor | None,
        *,
        ids_path: str | None = None,
        inherited: bool = False,
    ) -> None:
        self.dir = root
        self._open = backing_open
        self._close = backing_close
        self._executor = executor
        self.enabled = True
        #: After a take-over: (slot, node) -> backing id registered by the previous daemon;
        #: only these nodes pass through (see the module docstring).
        self.inherited: dict[tuple[int, int], int] | None = None
        # (merged files an inherited id uses stay alive in the kernel once unlinked)
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root, exist_ok=True)
        self._ids_fd = -1
        if ids_path is not None:
            if inherited:
                self.inherited = _read_ids(ids_path)
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
            self._ids_fd = os.open(ids_path, flags | (0 if inherited else os.O_TRUNC), 0o600)

    # --- the open path (event loop thread) ---------------------------------------------------

    def backing_for(self, m: Any, node: int) -> int:
        """A backing id for ``node`` of mounted layer ``m``, or 0 (serve it ourselves)."""
        bid = m.backing.get(node)
        if bid is not None:
            return bid
        if self.inherited is not None:
            bid = self.inherited.pop((m.slot, node), 0)
            if bid:
                m.backing[node] = bid
            return bid
        if not self.enabled or m.cached_opens.get(node):
            return 0
        path = m.merged.get(node)
        if path is None:
            path = self._single_chunk_file(m.layer, node)
            if path is None:
                return 0
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
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
        return bid

    def released(self, m: Any, node: int) -> None:
        """A cached open of ``node`` ended: merge the file if it is now wholly cached."""
        if (
            not self.enabled
            or self.inherited is not None
            or node in m.merged
            or node in m.merging
            or self._executor is None
            or m.layer.closed
        ):
            return
        keys = self._chunk_files(m.layer, node)
        if keys is None or len(keys) < 2:
            return
        m.merging.add(node)
        dest = os.path.join(self.dir, f"{m.slot}-{node}")
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executor, _merge, keys, dest)

        def done(f: asyncio.Future[bool]) -> None:
            m.merging.discard(node)
            ok = not f.cancelled() and f.exception() is None and f.result()
            if ok and not m.layer.closed:
                m.merged[node] = dest
            else:
                _unlink(dest)

        fut.add_done_callback(done)

    def close(self) -> None:
        if self._ids_fd >= 0:
            os.close(self._ids_fd)
            self._ids_fd = -1

    def drop(self, m: Any) -> None:
        """Layer ``m`` is unmounted: close its backing ids, delete its merged files."""
        for bid in m.backing.values():
            self._close(bid)  # open files keep their own reference
        m.backing.clear()
        for path in m.merged.values():
            _unlink(path)
        m.merged.clear()

    # --- what is cached -----------------------------------------------------------------------

    @staticmethod
    def _chunk_files(layer: Any, node: int) -> list[tuple[str, int]] | None:
        """(cache file, size) of each chunk of ``node`` in order, if all are cached and
        verified; else None."""
        size = layer.reader.nodes[node].size
        if size <= 0:
            return None
        lo, hi = layer.chunks.cover(node, 0, size)
        disk = layer.disk
        out = []
        expect = 0
        for r in range(lo, hi):
            key = layer.keys[r]
            n = layer.row_size[r]
            if layer.row_coff[r] != expect or disk.size_of(key) != n:
                return None
            if layer.verify_keys and not disk.is_verified(key):
                return None
            out.append((disk.path(key), n))
            expect += n
        return out if expect == size else None

    def _single_chunk_file(self, layer: Any, node: int) -> str | None:
        files = self._chunk_files(layer, node)
        if files is None or len(files) != 1:
            return None
        return files[0][0]


def _read_ids(path: str) -> dict[tuple[int, int], int]:
    out: dict[tuple[int, int], int] = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and all(p.isdigit() for p in parts):
                    out[(int(parts[0]), int(parts[1]))] = int(parts[2])
    except OSError:
        pass
    return out


def _merge(parts: list[tuple[str, int]], dest: str) -> bool:
    """Concatenate chunk files into ``dest`` (kernel-side copies). Blocking."""
    tmp = f"{dest}.tmp"
    try:
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            for path, size in parts:
                src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    left = size
                    while left:
                        n = os.copy_file_range(src, out, left)
                        if n <= 0:
                            raise OSError(f"{path} is shorter than {size} bytes")
                        left -= n
                finally:
                    os.close(src)
        finally:
            os.close(out)
        os.rename(tmp, dest)
        return True
    except OSError as e:
        # a chunk evicted meanwhile, a full disk: the file stays served by the daemon
        log.debug("merging %s for passthrough failed: %s", dest, e)
        _unlink(tmp)
        return False


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
