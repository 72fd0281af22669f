"""Getting a FUSE connection: open ``/dev/fuse``, mount(2) it, and the INIT handshake.

Kept apart from serving (`stargz.fuse.session`): a `Session` serves any fd whose INIT
is done, whether `mount` made it, a test made it (a socketpair standing in for the
device), or it was handed over by another process that held it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
from dataclasses import dataclass

from stargz.fuse import protocol as p

log = logging.getLogger("stargz.fuse")

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MNT_DETACH = 2
#: Largest READ the kernel may send, in pages (256 x 4 KiB = 1 MiB).
READ_MAX_PAGES = 256
#: The pipe spliced answers go through: a 1 MiB answer takes 258 pipe buffers (one per
#: page, one for the header, one more where the range starts mid-page), so 2 MiB (sizes
#: are powers of two pages). Past ``/proc/sys/fs/pipe-max-size`` (1 MiB by default) only
#: with CAP_SYS_RESOURCE; without it READs are asked to be smaller (`splice_read_pages`).
SPLICE_PIPE_SIZE = 2 << 20
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: The device refuses reads into less than FUSE_MIN_READ_BUFFER (8 KiB), whatever the
#: request's size.
_INIT_BUFFER = 8192
#: What we ask for in INIT, when the kernel offers it. READDIRPLUS always, not "auto"
#: (as go-fuse): with auto the kernel asks READDIRPLUS only for a directory's first
#: answer, and a large directory's other entries cost one LOOKUP each.
WANTED_FLAGS = (
    p.ASYNC_READ
    | p.BIG_WRITES
    | p.DO_READDIRPLUS
    | p.PARALLEL_DIROPS
    | p.MAX_PAGES
    | p.CACHE_SYMLINKS
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def splice_pipe() -> tuple[int, int, int]:
    """A non-blocking pipe for spliced answers, as large as this process may make it up
    to `SPLICE_PIPE_SIZE`: ``(read end, write end, size in bytes)``."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    size = SPLICE_PIPE_SIZE
    while size > PAGE_SIZE:
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
            break
        except OSError:  # EPERM: past pipe-max-size without CAP_SYS_RESOURCE
            size >>= 1
    return r, w, fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)


def splice_read_pages() -> int:
    """The largest READ (pages, a power of two up to `READ_MAX_PAGES`) whose answer fits
    the pipe `splice_pipe` makes. Measured (bench_fs.py, page cache warm): 512 KiB READs
    spliced beat 1 MiB READs copied by 1.5x, so a smaller pipe asks for smaller READs
    rather than copy the large ones."""
    try:
        r, w, size = splice_pipe()
    except OSError:
        return READ_MAX_PAGES
    os.close(r)
    os.close(w)
    pages = READ_MAX_PAGES
    while pages > 1 and pages + 2 > size // PAGE_SIZE:
        pages >>= 1
    return pages


@dataclass
class Connection:
    """A FUSE device fd whose INIT is done, and what INIT agreed on."""

    fd: int
    #: The protocol minor version both sides speak (7.x).
    proto_minor: int
    #: The INIT flags (flags | flags2 << 32) both sides agreed on.
    flags: int
    #: Where it is mounted (None: not mounted by us, e.g. a test's fake device); a
    #: session closing the connection unmounts it.
    mountpoint: str | None = None
    #: The INIT flags the kernel offered (what it can do, e.g. `HAS_RESEND`).
    offered: int = 0
    #: The largest READ the kernel sends, in pages (INIT's ``max_pages``).
    max_pages: int = READ_MAX_PAGES

    @property
    def passthrough(self) -> bool:
        """Whether the kernel agreed to FUSE passthrough (`Session.backing_open`)."""
        return bool(self.flags & p.PASSTHROUGH)


def handshake(fd: int, *, passthrough: bool, splice: bool = False) -> Connection:
    """Read the kernel's INIT from ``fd`` (blocking) and answer it.

    ``splice``: tell the kernel that READ answers may be spliced (`SPLICE_WRITE`; the
    kernel takes a spliced answer either way, see `stargz.fuse.session`), and ask for
    READs no larger than the splice pipe holds (`splice_read_pages`).

    Raises OSError(EPROTO) for anything but an INIT of protocol 7 (an INIT of another
    major version is answered with EPROTO first, as the kernel expects).
    """
    buf = bytearray(_INIT_BUFFER)
    n = os.readv(fd, [buf])
    hs = p.IN_HEADER.size
    if n < hs:
        raise OSError(errno.EPROTO, f"FUSE: a {n}-byte request instead of INIT")
    length, opcode, unique = p.IN_HEADER.unpack_from(buf)[:3]
    if opcode != p.Opcode.INIT or n < hs + p.INIT_IN_COMPAT.size or length != n:
        _reply(fd, unique, -errno.EPROTO)
        raise OSError(errno.EPROTO, f"FUSE: expected INIT, got opcode {opcode} ({n} bytes)")
    major, minor, max_readahead, flags = p.INIT_IN_COMPAT.unpack_from(buf, hs)
    flags2 = 0
    if flags & p.INIT_EXT and n >= hs + p.INIT_IN.size:
        flags2 = p.INIT_IN.unpack_from(buf, hs)[4]
    offered = flags | (flags2 << 32)
    if major != p.KERNEL_MAJOR:
        _reply(fd, unique, -errno.EPROTO)
        raise OSError(errno.EPROTO, f"FUSE: kernel protocol {major}.{minor} is not 7.x")
    want = WANTED_FLAGS
    if passthrough:
        want |= p.INIT_EXT | p.PASSTHROUGH
    if splice:
        want |= p.SPLICE_WRITE
    got = offered & want
    pages = splice_read_pages() if splice else READ_MAX_PAGES
    conn = Connection(fd, min(minor, p.KERNEL_MINOR), got, offered=offered, max_pages=pages)
    body = p.INIT_OUT.pack(
        p.KERNEL_MAJOR,
        conn.proto_minor,
        max_readahead,
        got & 0xFFFFFFFF,
        16,  # max_background
        12,  # congestion_threshold
        4096,  # max_write (read-only; the read buffer must hold max_write + headers)
        1,  # time_gran (ns)
        pages,
        0,  # map_alignment
        got >> 32,
        1 if conn.passthrough else 0,  # max_stack_depth: backing files are not stacked
    )
    _reply(fd, unique, 0, body)
    log.debug(
        "FUSE connection",
        extra={
            "protocol": f"7.{conn.proto_minor}",
            "passthrough": conn.passthrough,
            "splice": bool(got & p.SPLICE_WRITE),
            "max_read_kb": pages * PAGE_SIZE >> 10,
        },
    )
    return conn


def _reply(fd: int, unique: int, error: int, body: bytes = b"") -> None:
    os.writev(fd, [p.OUT_HEADER.pack(p.OUT_HEADER.size + len(body), error, unique), body])


def mount(
    mountpoint: str,
    *,
    fsname: str = "stargz",
    subtype: str = "stargz",
    allow_other: bool = True,
    passthrough: bool = True,
    splice: bool = False,
) -> Connection:
    """Mount a read-only FUSE filesystem on ``mountpoint`` and do INIT (blocks briefly;
    needs CAP_SYS_ADMIN). The kernel checks mode bits itself (default_permissions)."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,default_permissions"
        if allow_other:
            opts += ",allow_other"
        if (
            _libc.mount(
                fsname.encode(),
                os.fsencode(mountpoint),
                f"fuse.{subtype}".encode(),
                MS_RDONLY | MS_NOSUID | MS_NODEV,
                opts.encode(),
            )
            != 0
        ):
            err = ctypes.get_errno()
            raise OSError(err, f"mount FUSE on {mountpoint}: {os.strerror(err)}")
    except BaseException:
        os.close(fd)
        raise
    try:
        conn = handshake(fd, passthrough=passthrough, splice=splice)
    except BaseException:
        unmount(mountpoint)
        os.close(fd)
        raise
    conn.mountpoint = mountpoint
    return conn


def unmount(mountpoint: str) -> None:
    """Detach ``mountpoint`` (lazily: open files keep working until closed)."""
    _libc.umount2(os.fsencode(mountpoint), MNT_DETACH)
