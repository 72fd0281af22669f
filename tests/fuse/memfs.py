"""A toy in-memory read-only filesystem implementing `stargz.fuse.Operations`: the
library's user in the protocol tests (not a stand-in for the real filesystem).

/            ino 1
  hello      ino 2  b"hello world\n", xattr user.k = b"value"
  link       ino 3  -> b"hello"
  sub/       ino 4  empty
  slow       ino 5  reads wait for a gate the test opens (or interrupts)
  boom       ino 6  reads raise (a handler bug)
  slowboom   ino 7  reads wait, then raise
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Coroutine
from typing import Any

from stargz.fuse import (
    ROOT_INODE,
    DirBuffer,
    EntryAttributes,
    FileInfo,
    FUSEError,
    StatvfsData,
)

HELLO = b"hello world\n"
SLOW = b"slow data"
FILES = {
    b"hello": 2,
    b"link": 3,
    b"sub": 4,
    b"slow": 5,
    b"boom": 6,
    b"slowboom": 7,
}
MODES = {
    1: stat.S_IFDIR | 0o755,
    2: stat.S_IFREG | 0o644,
    3: stat.S_IFLNK | 0o777,
    4: stat.S_IFDIR | 0o755,
    5: stat.S_IFREG | 0o644,
    6: stat.S_IFREG | 0o644,
    7: stat.S_IFREG | 0o644,
}
SIZES = {2: len(HELLO), 3: 5, 5: len(SLOW), 6: 10, 7: 10}
MTIME_NS = 1_700_000_000_123_456_789


class MemFS:
    def __init__(self) -> None:
        self.released: list[int] = []
        #: a future per waiting read of "slow"/"slowboom", by offset (the test completes
        #: them); and what became of each wait
        self.gates: dict[int, asyncio.Future[None]] = {}
        self.outcomes: dict[int, str] = {}

    def attr(self, ino: int) -> EntryAttributes:
        if ino not in MODES:
            raise FUSEError(errno.ENOENT)
        a = EntryAttributes()
        a.st_ino = ino
        a.st_mode = MODES[ino]
        a.st_nlink = 2 if stat.S_ISDIR(a.st_mode) else 1
        a.st_uid, a.st_gid = 1000, 1001
        a.st_size = SIZES.get(ino, 0)
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = MTIME_NS
        a.attr_timeout, a.entry_timeout = 2.5, 7.0
        return a

    def lookup(self, parent_inode: int, name: bytes) -> EntryAttributes:
        if parent_inode != ROOT_INODE:
            raise FUSEError(errno.ENOENT if parent_inode == 4 else errno.ENOTDIR)
        ino = FILES.get(name)
        if ino is None:
            raise FUSEError(errno.ENOENT)
        return self.attr(ino)

    def getattr(self, inode: int) -> EntryAttributes:
        return self.attr(inode)

    def readlink(self, inode: int) -> bytes:
        if inode != 3:
            raise FUSEError(errno.EINVAL)
        return b"hello"

    def open(self, inode: int, flags: int) -> FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY:
            raise FUSEError(errno.EROFS)
        if inode not in SIZES or inode == 3:
            raise FUSEError(errno.EISDIR)
        return FileInfo(fh=inode + 100, keep_cache=inode == 2)

    def read(self, fh: int, offset: int, size: int) -> bytes | Coroutine[Any, Any, bytes]:
        ino = fh - 100
        if ino == 2:
            return HELLO[offset : offset + size]
        if ino == 6:
            raise RuntimeError("a handler bug")
        if ino in (5, 7):
            return self._slow(ino, offset, size)
        raise FUSEError(errno.EBADF)

    async def _slow(self, ino: int, offset: int, size: int) -> bytes:
        gate = self.gates[offset] = asyncio.get_running_loop().create_future()
        try:
            await gate
        except asyncio.CancelledError:
            self.outcomes[offset] = "cancelled"
            raise
        self.outcomes[offset] = "done"
        if ino == 7:
            raise RuntimeError("a handler bug after waiting")
        return SLOW[offset : offset + size]

    def release(self, fh: int) -> None:
        self.released.append(fh)

    def opendir(self, inode: int) -> int:
        if inode not in (1, 4):
            raise FUSEError(errno.ENOTDIR)
        return inode + 200

    def readdir(self, fh: int, start_id: int, out: DirBuffer) -> None:
        ino = fh - 200
        entries = [(b".", ino), (b"..", 1)]
        if ino == 1:
            entries += list(FILES.items())
        for i in range(start_id, len(entries)):
            name, child = entries[i]
            if not out.add(name, self.attr(child), i + 1):
                return

    def statfs(self) -> StatvfsData:
        s = StatvfsData()
        s.f_blocks, s.f_files = 1234, 7
        return s

    def getxattr(self, inode: int, name: bytes) -> bytes:
        if inode == 2 and name == b"user.k":
            return b"value"
        raise FUSEError(errno.ENODATA)

    def listxattr(self, inode: int) -> list[bytes]:
        return [b"user.k", b"user.other"] if inode == 2 else []
