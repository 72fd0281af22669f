"""mount(2)/umount2(2) through ctypes, and the FUSE bdi/connection knobs in sysfs.

Everything here blocks, and anything that touches a path inside our own FUSE mount makes
the kernel send a request to the daemon: call these from a worker thread, never from the
event loop thread that serves FUSE (it would deadlock).
"""

from __future__ import annotations

import ctypes
import errno
import os

from stargz import mountinfo

MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MNT_FORCE = 1
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def bind_mount(source: str, target: str, *, readonly: bool = True) -> None:
    """``mount --bind source target`` (then remount it read-only)."""
    src, dst = os.fsencode(source), os.fsencode(target)
    _check(_libc.mount(src, dst, None, MS_BIND, None), f"bind mount {source} on {target}")
    if readonly:
        try:
            _check(
                _libc.mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None),
                f"remount {target} read-only",
            )
        except OSError:
            unmount(target, MNT_DETACH)
            raise


def unmount(target: str, flags: int = 0) -> bool:
    """umount2(2). Returns False when ``target`` was not a mount point (or is gone)."""
    if _libc.umount2(os.fsencode(target), flags) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return False
        raise OSError(err, f"umount {target}: {os.strerror(err)}")
    return True


def unmount_robust(target: str) -> bool:
    """Unmount; when busy, detach lazily (the mount goes once its last user leaves)."""
    try:
        return unmount(target)
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        return unmount(target, MNT_DETACH)


def is_mountpoint(path: str) -> bool:
    """Whether ``path`` (absolute, normalized) is in this process's mount table."""
    return path in mountinfo.mount_points()


def device_of(path: str) -> int:
    return os.stat(path).st_dev


def set_read_ahead_kb(dev: int, kb: int) -> int | None:
    """Set the bdi read-ahead of a FUSE mount (its st_dev); returns the old value."""
    p = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(p) as f:
            old = int(f.read().strip())
        with open(p, "w") as f:
            f.write(str(kb))
        return old
    except OSError:
        return None


def abort_connection(dev: int) -> bool:
    """Abort a FUSE connection (every pending and future request fails with ENOTCONN).

    The last resort when the daemon's loop is gone and a mount would hang its users.
    """
    p = f"/sys/fs/fuse/connections/{os.minor(dev)}/abort"
    try:
        with open(p, "w") as f:
            f.write("1")
        return True
    except OSError:
        return False
