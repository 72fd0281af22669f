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
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from stargz.private import DIR_MODE, FILE_MODE

log = logging.getLogger("stargz.fs")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]


class Passthrough:
    """Backing files for the nodes of mounted layers (one instance per FUSE session)."""

    def __init__(
        self,
        root: str,
        backing_open: Callable[[int], int],
        backing_close: Callable[[int], None],
        executor: Executor | None,
    ) -> None:
        self.dir = root
        self._open = backing_open
        self._close = backing_close
        self._executor = executor
        self.enabled = True
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root, DIR_MODE, exist_ok=True)

    # --- the open path (event loop thread) ---------------------------------------------------

    def backing_for(self, m: Any, node: int) -> int:
        """A backing id for ``node`` of mounted layer ``m``, or 0 (serve it ourselves)."""
        bid = m.backing.get(node)
        if bid is not None:
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
        return bid

    def released(self, m: Any, node: int) -> None:
        """A cached open of ``node`` ended: merge the file if it is now wholly cached."""
        if (
            not self.enabled
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
        files = layer.chunk_files(node)
        return [(f.path, f.size) for f in files] if files else None

    def _single_chunk_file(self, layer: Any, node: int) -> str | None:
        files = self._chunk_files(layer, node)
        if files is None or len(files) != 1:
            return None
        return files[0][0]


def _merge(parts: list[tuple[str, int]], dest: str) -> bool:
    """Concatenate chunk files into ``dest`` (kernel-side copies). Blocking."""
    tmp = f"{dest}.tmp"
    try:
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
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
    root: str,
    executor: Executor | None,
    *,
    refused: str | None = None,
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
        pt = Passthrough(root, session.backing_open, session.backing_close, executor)
        reason = _probe(pt)
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
    """Why the kernel would refuse backing files under ``pt.dir``, or None if it takes one."""
    path = os.path.join(pt.dir, ".probe")
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
