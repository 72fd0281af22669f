"""Handing the FUSE connection from one daemon process to the next.

A `Handover` keeps the ``/dev/fuse`` descriptor (and the few INIT parameters negotiated
on it, which the kernel never repeats) outside the daemon, so a restart does not end the
connection. Two keepers:

- `HolderHandover`: a small holder process (`stargz.fuse.holder`) started by the daemon
  in its own session; works anywhere;
- `SystemdHandover`: systemd's file-descriptor store (`stargz.fuse.fdstore`), for a unit
  with ``FileDescriptorStoreMax=1`` (a holder would die with the unit's cgroup). The
  state goes to a 0600 file next to the store's name, since the store keeps only fds.

The daemon calls ``take`` once at start (a live descriptor: serve it instead of
mounting), ``keep`` right after a fresh mount's INIT (from then on a kill of the daemon
leaves the mount alive), and ``release`` on a stop that unmounts (nothing to hand on).
"""

from __future__ import annotations

import contextlib
import os
import select
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Protocol

from stargz.fuse import fdstore
from stargz.fuse.holder import HolderClient

#: The name the descriptor is stored under (``FDNAME``, ``LISTEN_FDNAMES``).
FD_NAME = "stargz-fuse"


@dataclass
class Kept:
    """A descriptor handed over by a previous daemon, and the state it kept with it."""

    fd: int
    state: bytes


class Handover(Protocol):
    kind: str

    def take(self) -> Kept | None: ...

    def keep(self, fd: int, state: bytes) -> None: ...

    def release(self) -> None: ...


def connected(fd: int) -> bool:
    """Whether the FUSE connection behind ``fd`` is still up (an unmounted or aborted
    connection polls POLLERR; a live one with queued requests is merely readable)."""
    p = select.poll()
    p.register(fd, 0)
    return not any(ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, ev in p.poll(0))


class HolderHandover:
    """The holder process in ``directory`` (created 0700)."""

    kind = "holder"

    def __init__(self, directory: str) -> None:
        self.client = HolderClient(directory)

    def take(self) -> Kept | None:
        got = self.client.get()
        return Kept(*got) if got is not None else None

    def keep(self, fd: int, state: bytes) -> None:
        self.client.spawn()
        self.client.put(fd, state)

    def release(self) -> None:
        self.client.drop()


class SystemdHandover:
    """systemd's descriptor store; the state goes to ``state_path`` (0600)."""

    kind = "systemd"

    def __init__(self, state_path: str, env: MutableMapping[str, str] | None = None) -> None:
        self.state_path = state_path
        self.env = os.environ if env is None else env
        self._passed = fdstore.listen_fds(self.env)

    def take(self) -> Kept | None:
        fds = self._passed.pop(FD_NAME, [])
        for extra in fds[1:]:
            os.close(extra)
        if not fds:
            return None
        try:
            with open(self.state_path, "rb") as f:
                state = f.read()
        except OSError:
            state = b""
        return Kept(fds[0], state)

    def keep(self, fd: int, state: bytes) -> None:
        # the state first: a descriptor in the store without it could not be served
        _write_private(self.state_path, state)
        fdstore.store(fd, FD_NAME, self.env)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            fdstore.remove(FD_NAME, self.env)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.state_path)


def _write_private(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def choose(root: str, env: MutableMapping[str, str] | None = None) -> Handover | None:
    """systemd's store when the unit has one; a holder process under ``root`` outside
    systemd; None under systemd without a store (a holder in the unit's cgroup would be
    killed by a restart anyway, and would hold up ``systemctl stop`` until its timeout)."""
    env = os.environ if env is None else env
    if fdstore.available(env) or FD_NAME in env.get("LISTEN_FDNAMES", "").split(":"):
        return SystemdHandover(os.path.join(root, "fuse-handover.json"), env)
    if env.get("NOTIFY_SOCKET"):
        return None
    return HolderHandover(os.path.join(root, "holder"))
