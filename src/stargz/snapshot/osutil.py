"""Small Linux helpers the snapshotter needs: disk usage, mount table, unmount, overlay probes.

All of them block; the snapshotter calls them from worker threads.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys

from stargz import mountinfo

from .types import Usage

MNT_FORCE = 1
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


def disk_usage(root: str) -> Usage:
    """Bytes and inodes under ``root`` the way containerd's ``fs.DiskUsage`` counts them.

    Each inode (hard links once) adds its allocated blocks × 512; ``root`` itself counts.
    """
    st = os.lstat(root)
    seen = {(st.st_dev, st.st_ino)}
    size = st.st_blocks * 512
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for e in entries:
                st = e.stat(follow_symlinks=False)
                ident = (st.st_dev, st.st_ino)
                if ident not in seen:
                    seen.add(ident)
                    size += st.st_blocks * 512
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
    return Usage(size=size, inodes=len(seen))


def mountpoints_under(path: str) -> list[str]:
    """Mount points at or below ``path``, deepest first (the order to unmount them in)."""
    prefix = os.path.join(os.path.realpath(path), "")
    found = {mp for mp in mountinfo.mount_points() if os.path.join(mp, "").startswith(prefix)}
    return sorted(found, key=lambda p: (-p.count("/"), p))


def unmount(path: str, flags: int = 0) -> None:
    """umount2(2); raises OSError. EINVAL (not a mount point) and ENOENT are not errors."""
    if _libc.umount2(os.fsencode(path), flags) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount {path}: {os.strerror(err)}")


def unmount_all_under(path: str) -> list[str]:
    """Unmount everything at or below ``path``; returns what is still mounted afterwards."""
    for mp in mountpoints_under(path):
        try:
            unmount(mp)
        except OSError:
            try:
                unmount(mp, MNT_DETACH)
            except OSError:
                pass
    return mountpoints_under(path)


def remove_tree(path: str) -> None:
    """``rm -rf path``; a path that vanishes meanwhile (another remover) is fine."""

    def onexc(func: object, p: str, exc: BaseException) -> None:
        if not isinstance(exc, FileNotFoundError):
            raise exc

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=onexc)
    else:
        shutil.rmtree(path, onerror=lambda func, p, info: onexc(func, p, info[1]))


def running_in_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            fields = f.read().split()
    except OSError:
        return False
    return fields != ["0", "0", "4294967295"]


def needs_userxattr() -> bool:
    """Whether overlay needs ``userxattr`` (containerd's ``NeedsUserXAttr``).

    Only for overlay mounted inside a user namespace (rootless), where trusted.* xattrs are
    not available; kernels that allow that (5.11+) all know the option.
    """
    return running_in_user_namespace()


def supports_overlay_index() -> bool:
    """Whether the kernel knows overlay's ``index=`` option; containerd then sets index=off."""
    return os.path.exists("/sys/module/overlay/parameters/index")
