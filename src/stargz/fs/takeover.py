"""What a daemon checks and records to hand its FUSE connection to the next one.

The keeper (`stargz.fuse.handover`) stores a descriptor and opaque state bytes; this
module decides what the state holds (the INIT parameters, which the kernel never sends
again, and the mount's device number) and whether a descriptor handed back may be served:
it must be ``/dev/fuse``, its connection up, and ``fuse_dir`` still its mount. Everything
here avoids ``stat`` on the mount: nobody may be answering its requests yet.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat

from stargz import mountinfo
from stargz.errors import FailedPrecondition
from stargz.fuse import Connection
from stargz.fuse.handover import Kept, connected

FSTYPE = "fuse.stargz"


#: Version of the state kept with the descriptor (a state without one is version 1). A
#: daemon never serves a connection whose state is newer than it knows.
STATE_FORMAT = 1


def state_of(conn: Connection, dev: int) -> bytes:
    """What is kept with the descriptor of ``conn``, mounted as device ``dev``."""
    return json.dumps(
        {
            "format": STATE_FORMAT,
            "proto_minor": conn.proto_minor,
            "flags": conn.flags,
            "offered": conn.offered,
            "dev": dev_str(dev),
        }
    ).encode()


def check(kept: Kept, fuse_dir: str) -> tuple[Connection, int] | str:
    """The connection to serve and its device, or why ``kept`` must not be served."""
    try:
        state = json.loads(kept.state)
        if int(state.get("format", 1)) > STATE_FORMAT:
            return f"its INIT state has format {state['format']}, newer than this daemon's"
        dev = parse_dev(state["dev"])
        conn = Connection(
            kept.fd,
            int(state["proto_minor"]),
            int(state["flags"]),
            fuse_dir,
            offered=int(state["offered"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return "its INIT state is missing or damaged"
    if not _is_fuse_device(kept.fd):
        return "the kept descriptor is not /dev/fuse"
    if not connected(kept.fd):
        return "the connection has ended"
    if mount_dev(fuse_dir) != dev:
        return f"{fuse_dir} is no longer that connection's mount"
    return conn, dev


def mount_dev(path: str) -> int | None:
    """The device of our FUSE mount at ``path`` (the last one stacked there), from the
    mount table."""
    found = [e for e in mountinfo.entries() if e[0] == _real(path) and e[3] == FSTYPE]
    return parse_dev(found[-1][1]) if found else None


def bound(mp: str, dev: int | None, subtree: str) -> bool:
    """Whether ``mp`` is a bind mount of ``subtree`` (e.g. ``/<digest hex>``) of the FUSE
    mount with device ``dev``."""
    found = [e for e in mountinfo.entries() if e[0] == _real(mp)]
    return bool(found) and found[-1][1] == dev_str(dev) and found[-1][2] == subtree


def lock_root(root: str) -> int:
    """An exclusive flock on ``<root>/fuse.lock``, held while a daemon serves the root's
    connection (the kernel drops it when the process dies, even by SIGKILL)."""
    fd = os.open(os.path.join(root, "fuse.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FailedPrecondition(
            f"another daemon serves the FUSE connection of {root}; not taking it over"
        ) from None
    return fd


def _real(path: str) -> str:
    # (the parent resolved, not the path itself: resolving it would stat the mount)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _is_fuse_device(fd: int) -> bool:
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.stat("/dev/fuse").st_rdev


def parse_dev(text: str) -> int:
    major, _, minor = text.partition(":")
    return os.makedev(int(major), int(minor))


def dev_str(dev: int | None) -> str:
    return "" if dev is None else f"{os.major(dev)}:{os.minor(dev)}"
