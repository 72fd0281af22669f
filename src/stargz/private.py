"""Directories and files the daemon keeps to itself.

The FUSE mount under ``<root>/fuse`` is ``allow_other`` (containers need it), so the only
thing standing between a host user and every lazily mounted image is the mode of the
directories above it. The daemon root and everything it creates below it are therefore
0700 (directories) and 0600 (files), whatever the umask, and a root that already exists
with a wider mode is narrowed at start.
"""

from __future__ import annotations

import logging
import os
import stat

log = logging.getLogger("stargz")

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: str) -> None:
    """Create ``path`` (0700), or narrow an existing directory to 0700 and say so."""
    os.makedirs(path, DIR_MODE, exist_ok=True)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode != DIR_MODE:
        os.chmod(path, DIR_MODE)
        log.warning(
            "narrowed a directory of the daemon to 0700",
            extra={"path": path, "old_mode": f"{mode:04o}"},
        )


def private_file(path: str) -> None:
    """Make ``path`` an existing file of mode 0600 (created empty if missing), so that a
    library that opens it later (SQLite) keeps that mode, also for its side files."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def narrow_file(path: str) -> None:
    """Narrow an existing file to 0600 (nothing if it does not exist)."""
    try:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) != FILE_MODE:
            os.chmod(path, FILE_MODE)
    except FileNotFoundError:
        pass
