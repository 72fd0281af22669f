"""What a filesystem gives the session: the handler object's typed contract.

A `stargz.fuse.session.Session` decodes each request and calls one method of its
handler object with plain values (inode numbers, file handles, names as bytes); the
method's return value is packed into the reply. The rules every method follows:

- raise `FUSEError(errno)` to answer with an errno; anything else a handler raises is
  logged, reported to the session's ``on_handler_error`` hook and answered with EIO;
- return at once when the answer is at hand. Only ``read`` may instead return a
  coroutine (a chunk that must be fetched first); see `stargz.fuse.session` for how it
  is run, and for what a handler may keep of its arguments;
- never block: handlers run on the event loop that serves every request.

Inode 1 (`ROOT_INODE`) is the mount's root. ``fh`` values are whatever ``open`` /
``opendir`` returned for that open.
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterable
from typing import Any, Protocol, runtime_checkable

from stargz.fuse.protocol import DirBuffer, Entry, FileInfo, FileRanges, StatvfsData


@runtime_checkable
class Operations(Protocol):
    """The handlers of a read-only filesystem (the opcodes `Session` dispatches). The
    session passes arguments by position, so implementations may name them freely."""

    def lookup(self, parent_inode: int, name: bytes, /) -> Entry:
        """LOOKUP: the entry ``name`` in directory ``parent_inode``. An entry with
        ``st_ino`` 0 is a negative answer the kernel caches for its entry timeout."""
        ...

    def getattr(self, inode: int, /) -> Entry:
        """GETATTR: the attributes of ``inode``."""
        ...

    def readlink(self, inode: int, /) -> bytes:
        """READLINK: the target of symlink ``inode``."""
        ...

    def open(self, inode: int, flags: int, /) -> FileInfo:
        """OPEN: a handle for file ``inode`` (``flags``: the open(2) flags)."""
        ...

    def read(
        self, fh: int, offset: int, size: int, /
    ) -> bytes | FileRanges | Coroutine[Any, Any, bytes]:
        """READ: up to ``size`` bytes at ``offset`` (fewer only at end of file), or a
        coroutine that returns them, or `FileRanges` holding them (for the session to
        splice; see `stargz.fuse.session`)."""
        ...

    def release(self, fh: int, /) -> None:
        """RELEASE: the last close of an ``open`` handle."""
        ...

    def opendir(self, inode: int, /) -> int:
        """OPENDIR: a handle for directory ``inode`` (never called by a session made with
        ``dir_handles=False``)."""
        ...

    def readdir(self, fh: int, start_id: int, out: DirBuffer, /) -> None:
        """READDIR / READDIRPLUS: add entries from ``start_id`` on to ``out`` until
        ``out.add`` returns False (or a `stargz.fuse.listing.DirListing` fills it); each
        entry's ``next_id`` is where the next call starts. ``fh``: what ``opendir``
        returned, or the directory's inode with ``dir_handles=False``."""
        ...

    def statfs(self) -> StatvfsData:
        """STATFS: the filesystem's totals."""
        ...

    def getxattr(self, inode: int, name: bytes, /) -> bytes:
        """GETXATTR: the value of extended attribute ``name`` (ENODATA when absent)."""
        ...

    def listxattr(self, inode: int, /) -> Iterable[bytes]:
        """LISTXATTR: the names of ``inode``'s extended attributes."""
        ...
