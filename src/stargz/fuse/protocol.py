"""The FUSE kernel protocol (``include/uapi/linux/fuse.h``, 7.40): opcodes, flags, the
structs on the wire, and the reply values handlers return.

This module knows no filesystem and imports only the standard library (go-fuse's
``fuse/`` package is the model: the protocol below, the filesystem built on it).
Structs are little-endian and 64-bit aligned; each layout is written out as a `struct`
format next to the field names it packs, and code uses the structs' sizes, never
literal offsets.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Callable
from typing import Any

KERNEL_MAJOR = 7
KERNEL_MINOR = 40
ROOT_INODE = 1


class Opcode(enum.IntEnum):
    """``enum fuse_opcode``: what a request asks for (``fuse_in_header.opcode``)."""

    LOOKUP = 1
    FORGET = 2  # no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36  # no reply (or EAGAIN, see `stargz.fuse.session`)
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41  # no reply
    BATCH_FORGET = 42  # no reply
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52


#: Opcodes that change the filesystem: a read-only mount answers them with EROFS.
WRITE_OPCODES = frozenset(
    {
        Opcode.SETATTR,
        Opcode.SYMLINK,
        Opcode.MKNOD,
        Opcode.MKDIR,
        Opcode.UNLINK,
        Opcode.RMDIR,
        Opcode.RENAME,
        Opcode.LINK,
        Opcode.WRITE,
        Opcode.SETXATTR,
        Opcode.REMOVEXATTR,
        Opcode.CREATE,
        Opcode.FALLOCATE,
        Opcode.RENAME2,
        Opcode.COPY_FILE_RANGE,
        Opcode.TMPFILE,
    }
)
#: Opcodes the kernel expects no answer to.
NO_REPLY = frozenset({Opcode.FORGET, Opcode.INTERRUPT, Opcode.BATCH_FORGET, Opcode.NOTIFY_REPLY})
#: Bit set in the ``unique`` of an INTERRUPT request itself (its body names the request
#: it interrupts by that request's own ``unique``).
INT_REQ_BIT = 1 << 0

# --- INIT flags (bits 32.. go to flags2) -------------------------------------------------------
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
#: The server may answer with splice(2) into the device (the kernel accepts a spliced
#: reply whatever INIT said: the flag only tells it the server means to).
SPLICE_WRITE = 1 << 7
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
#: Offered by the kernel (5.1+): an OPENDIR answered with ENOSYS makes it open every
#: directory without asking from then on (no OPENDIR, no RELEASEDIR), and keep their
#: listings cached as if each open had answered ``FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR``.
NO_OPENDIR_SUPPORT = 1 << 24
INIT_EXT = 1 << 30
PASSTHROUGH = 1 << 37
#: Offered by the kernel (6.9+): it understands NOTIFY_RESEND, and marks a resent
#: request by setting the top bit of its ``unique`` (echoed back unchanged in the reply).
HAS_RESEND = 1 << 39

# --- OPEN reply flags --------------------------------------------------------------------------
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3
FOPEN_NOFLUSH = 1 << 5
FOPEN_PASSTHROUGH = 1 << 7

# --- notifications (sent as replies with unique 0 and the code in `error`) --------------------
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3
NOTIFY_STORE = 4
#: Put every request the server read but never answered back in the queue (no body).
NOTIFY_RESEND = 7

# --- device ioctls: _IOW(229, 1, struct fuse_backing_map) and _IOW(229, 2, uint32_t) ----------
DEV_IOC_BACKING_OPEN = 0x4010E501
DEV_IOC_BACKING_CLOSE = 0x4004E502

# --- structs ----------------------------------------------------------------------------------
#: fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
IN_HEADER = struct.Struct("<IIQQIIIHH")
#: the first fields of fuse_in_header: len, opcode, unique (to answer a truncated request)
IN_HEADER_PREFIX = struct.Struct("<IIQ")
#: fuse_out_header: len, error (negative errno), unique
OUT_HEADER = struct.Struct("<IiQ")
#: fuse_init_in as kernels before 7.36 send it: major, minor, max_readahead, flags
INIT_IN_COMPAT = struct.Struct("<IIII")
#: fuse_init_in up to flags2 (7.36+; unused[11] follows): ..., flags2
INIT_IN = struct.Struct("<IIIII")
#: fuse_init_out: major, minor, max_readahead, flags, max_background, congestion_threshold,
#: max_write, time_gran, max_pages, map_alignment, flags2, max_stack_depth, unused[6]
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
#: fuse_attr: ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec,
#: mode, nlink, uid, gid, rdev, blksize, flags
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")
#: fuse_entry_out without its attr: nodeid, generation, entry_valid, attr_valid,
#: entry_valid_nsec, attr_valid_nsec
ENTRY_OUT = struct.Struct("<QQQQII")
#: Offsets in fuse_entry_out of attr_valid (u64) and attr_valid_nsec (u32), which a
#: fuse_attr_out repeats (see `PackedEntry.attr_out`).
ENTRY_OUT_ATTR_VALID = struct.calcsize("<QQQ")
ENTRY_OUT_ATTR_VALID_NSEC = struct.calcsize("<QQQQI")
#: fuse_entry_out with its attr, in one pack (see `pack_entry`)
ENTRY_WITH_ATTR = struct.Struct("<QQQQII" + "QQQqqqIIIIIIIIII")
#: fuse_attr_out without its attr: attr_valid, attr_valid_nsec, dummy
ATTR_OUT = struct.Struct("<QII")
#: fuse_open_in: flags, open_flags
OPEN_IN = struct.Struct("<II")
#: fuse_open_out: fh, open_flags, backing_id
OPEN_OUT = struct.Struct("<QIi")
#: fuse_read_in: fh, offset, size, read_flags, lock_owner, flags, padding
READ_IN = struct.Struct("<QQIIQII")
#: fuse_release_in: fh, flags, release_flags, lock_owner
RELEASE_IN = struct.Struct("<QIIQ")
#: fuse_getxattr_in: size, padding (LISTXATTR sends the same struct)
GETXATTR_IN = struct.Struct("<II")
#: fuse_getxattr_out: size, padding
GETXATTR_OUT = struct.Struct("<II")
#: fuse_interrupt_in: unique (of the request to interrupt)
INTERRUPT_IN = struct.Struct("<Q")
#: fuse_kstatfs: blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, padding, spare[6]
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
#: fuse_dirent without its name: ino, off, namelen, type
DIRENT = struct.Struct("<QQII")
#: fuse_direntplus without its name: a fuse_entry_out (with its attr), then a fuse_dirent
DIRENTPLUS = struct.Struct("<" + ENTRY_WITH_ATTR.format[1:] + DIRENT.format[1:])
#: fuse_notify_store_out: nodeid, offset, size, padding
NOTIFY_STORE_OUT = struct.Struct("<QQII")
#: fuse_notify_inval_inode_out: ino, off, len (off < 0: attributes only; len <= 0: to the end)
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")
#: fuse_notify_inval_entry_out: parent, namelen, flags
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("<QII")
#: fuse_backing_map: fd, flags, padding
BACKING_MAP = struct.Struct("<iIQ")
#: the u32 argument of FUSE_DEV_IOC_BACKING_CLOSE: a backing id
BACKING_ID = struct.Struct("<I")


class FUSEError(Exception):
    """Raised by a handler: the request is answered with ``-errno``."""

    def __init__(self, errno: int) -> None:
        super().__init__(errno)
        self.errno = errno

    def __str__(self) -> str:
        return os.strerror(self.errno)


def _split_time(seconds: float) -> tuple[int, int]:
    s = int(seconds)
    return s, int((seconds - s) * 1e9)


class EntryAttributes:
    """What LOOKUP, GETATTR and READDIRPLUS tell the kernel about one inode.

    The packed answer is computed once (`entry_out`): the layers are immutable, so an
    attribute object never changes after a handler returned it.
    """

    __slots__ = (
        "st_ino",
        "st_mode",
        "st_nlink",
        "st_uid",
        "st_gid",
        "st_rdev",
        "st_size",
        "st_blksize",
        "st_blocks",
        "st_atime_ns",
        "st_mtime_ns",
        "st_ctime_ns",
        "attr_timeout",
        "entry_timeout",
        "_entry",
    )

    def __init__(self) -> None:
        self.st_ino = 0
        self.st_mode = 0
        self.st_nlink = 0
        self.st_uid = 0
        self.st_gid = 0
        self.st_rdev = 0
        self.st_size = 0
        self.st_blksize = 4096
        self.st_blocks = 0
        self.st_atime_ns = 0
        self.st_mtime_ns = 0
        self.st_ctime_ns = 0
        self.attr_timeout = 0.0
        self.entry_timeout = 0.0
        self._entry: bytes | None = None

    def _pack_attr(self) -> bytes:
        a, m, c = self.st_atime_ns, self.st_mtime_ns, self.st_ctime_ns
        return ATTR.pack(
            self.st_ino,
            self.st_size,
            self.st_blocks,
            a // 1_000_000_000,
            m // 1_000_000_000,
            c // 1_000_000_000,
            a % 1_000_000_000,
            m % 1_000_000_000,
            c % 1_000_000_000,
            self.st_mode,
            self.st_nlink,
            self.st_uid,
            self.st_gid,
            self.st_rdev & 0xFFFFFFFF,
            self.st_blksize,
            0,
        )

    def entry_out(self) -> bytes:
        """``struct fuse_entry_out`` (nodeid 0 + entry timeout = a cached negative entry)."""
        p = self._entry
        if p is None:
            es, ens = _split_time(self.entry_timeout)
            as_, ans = _split_time(self.attr_timeout)
            p = self._entry = ENTRY_OUT.pack(self.st_ino, 0, es, as_, ens, ans) + self._pack_attr()
        return p

    def attr_out(self) -> bytes:
        """``struct fuse_attr_out``."""
        s, ns = _split_time(self.attr_timeout)
        return ATTR_OUT.pack(s, ns, 0) + self.entry_out()[ENTRY_OUT.size :]


class PackedEntry:
    """A LOOKUP/GETATTR/READDIRPLUS answer packed at once (`pack_entry`): what
    `EntryAttributes` answers, without its per-field object (the hot path of walks)."""

    __slots__ = ("st_ino", "st_mode", "_entry")

    def __init__(self, st_ino: int, st_mode: int, entry: bytes) -> None:
        self.st_ino = st_ino
        self.st_mode = st_mode
        self._entry = entry

    def entry_out(self) -> bytes:
        return self._entry

    def attr_out(self) -> bytes:
        # fuse_attr_out: attr_valid, attr_valid_nsec, dummy, then the same fuse_attr
        e = self._entry
        return (
            e[ENTRY_OUT_ATTR_VALID : ENTRY_OUT_ATTR_VALID + 8]
            + e[ENTRY_OUT_ATTR_VALID_NSEC : ENTRY_OUT_ATTR_VALID_NSEC + 4]
            + b"\0\0\0\0"
            + e[ENTRY_OUT.size :]
        )


#: What LOOKUP, GETATTR and READDIRPLUS handlers answer with.
Entry = EntryAttributes | PackedEntry


def pack_entry(
    ino: int,
    entry_timeout: float,
    attr_timeout: float,
    stat_fields: tuple[int, int, int, int, int, int],
    mtime_ns: int,
    blksize: int = 4096,
) -> PackedEntry:
    """``stat_fields`` = (mode, nlink, uid, gid, rdev, size); all three times = mtime."""
    mode, nlink, uid, gid, rdev, size = stat_fields
    es, ens = _split_time(entry_timeout)
    as_, ans = _split_time(attr_timeout)
    sec, nsec = divmod(mtime_ns, 1_000_000_000)
    entry = ENTRY_WITH_ATTR.pack(
        ino, 0, es, as_, ens, ans,
        ino, size, (size + 511) // 512, sec, sec, sec, nsec, nsec, nsec,
        mode, nlink, uid, gid, rdev & 0xFFFFFFFF, blksize, 0,
    )  # fmt: skip
    return PackedEntry(ino, mode, entry)


class FileInfo:
    """The answer to OPEN: a file handle and how the kernel should cache the file.

    ``backing_id`` (from `Session.backing_open`) makes the kernel read the file straight
    from a backing file (FUSE passthrough): no READ request reaches the daemon.
    """

    __slots__ = ("fh", "direct_io", "keep_cache", "backing_id")

    def __init__(
        self, fh: int, *, direct_io: bool = False, keep_cache: bool = False, backing_id: int = 0
    ) -> None:
        self.fh = fh
        self.direct_io = direct_io
        self.keep_cache = keep_cache
        self.backing_id = backing_id

    def open_out(self) -> bytes:
        flags = FOPEN_NOFLUSH
        if self.direct_io:
            flags |= FOPEN_DIRECT_IO
        if self.keep_cache:
            flags |= FOPEN_KEEP_CACHE
        if self.backing_id:
            flags |= FOPEN_PASSTHROUGH
        return OPEN_OUT.pack(self.fh, flags, self.backing_id)


class FileRanges:
    """A READ answer whose bytes are ranges of open files, for the session to splice
    from the files into the device: the data never passes through Python.

    ``parts`` are ``(fd, offset, length)``; ``size`` their total. The fds must stay open
    until the handler's caller has answered (the session does so before it reads the next
    request). ``fallback()`` is the same answer the usual way (bytes, or a coroutine
    returning them), for when splicing is off or fails; it may raise `FUSEError`.
    """

    __slots__ = ("parts", "size", "fallback")

    def __init__(
        self,
        parts: tuple[tuple[int, int, int], ...],
        size: int,
        fallback: Callable[[], Any],
    ) -> None:
        self.parts = parts
        self.size = size
        self.fallback = fallback


class StatvfsData:
    """The answer to STATFS."""

    __slots__ = (
        "f_bsize",
        "f_frsize",
        "f_blocks",
        "f_bfree",
        "f_bavail",
        "f_files",
        "f_ffree",
        "f_favail",
        "f_namemax",
    )

    def __init__(self) -> None:
        self.f_bsize = self.f_frsize = 4096
        self.f_blocks = self.f_bfree = self.f_bavail = 0
        self.f_files = self.f_ffree = self.f_favail = 0
        self.f_namemax = 255

    def statfs_out(self) -> bytes:
        return STATFS_OUT.pack(
            self.f_blocks,
            self.f_bfree,
            self.f_bavail,
            self.f_files,
            self.f_ffree,
            self.f_bsize,
            self.f_namemax,
            self.f_frsize,
            0,
        )


class DirBuffer:
    """The body of one READDIR / READDIRPLUS answer, filled up to the kernel's size."""

    __slots__ = ("plus", "limit", "parts", "used")

    def __init__(self, plus: bool, limit: int) -> None:
        self.plus = plus
        self.limit = limit
        self.parts: list[bytes] = []
        self.used = 0

    def add(self, name: bytes, attr: Entry, next_id: int) -> bool:
        """Append an entry; False (and nothing appended) when it does not fit."""
        n = len(name)
        rec = DIRENT.size + n
        pad = -rec & 7
        head = attr.entry_out() if self.plus else b""
        size = len(head) + rec + pad
        if self.used + size > self.limit:
            return False
        self.parts.append(
            head + DIRENT.pack(attr.st_ino, next_id, n, (attr.st_mode >> 12) & 0xF) + name
        )
        if pad:
            self.parts.append(b"\0" * pad)
        self.used += size
        return True

    def body(self) -> bytes:
        return b"".join(self.parts)
