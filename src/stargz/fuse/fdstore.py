"""systemd's file-descriptor store: the ``sd_notify`` and ``LISTEN_FDS`` halves, stdlib only.

Under systemd the daemon's FUSE descriptor is kept by the service manager itself (a
holder process would be killed with the unit's cgroup on a restart). The unit needs
``FileDescriptorStoreMax=1`` (systemd then exports ``$FDSTORE``, v254 and later); on
``systemctl restart``, a crash with ``Restart=``, or ``kill -9``, systemd keeps the stored
descriptor and passes it to the next start of the service:

- store: a datagram ``FDSTORE=1\\nFDNAME=<name>`` on ``$NOTIFY_SOCKET`` carrying the
  descriptor as SCM_RIGHTS ancillary data (``sd_pid_notify_with_fds``);
- remove: ``FDSTOREREMOVE=1\\nFDNAME=<name>`` (systemd closes its copy);
- receive: the next process gets the descriptors from fd 3 on, with ``LISTEN_FDS`` (how
  many), ``LISTEN_FDNAMES`` (colon-separated names) and ``LISTEN_PID`` (its own pid; any
  other value means the variables were inherited and are not for us).

Nothing else of the project is imported.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping

#: First descriptor systemd passes (``SD_LISTEN_FDS_START``).
LISTEN_FDS_START = 3
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def available(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process runs under systemd with a descriptor store to use."""
    env = os.environ if env is None else env
    if not env.get("NOTIFY_SOCKET"):
        return False
    try:
        return int(env.get("FDSTORE", "0")) > 0
    except ValueError:
        return False


def _address(env: Mapping[str, str] | None) -> str:
    path = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not path:
        raise OSError("NOTIFY_SOCKET is not set: not running under systemd")
    return "\0" + path[1:] if path.startswith("@") else path  # "@": abstract socket


def notify(state: str, fds: list[int] | None = None, env: Mapping[str, str] | None = None) -> None:
    """Send ``state`` (``KEY=value`` lines) to systemd, with ``fds`` attached."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(_address(env))
        if fds:
            socket.send_fds(s, [state.encode()], fds)
        else:
            s.sendall(state.encode())


def store(fd: int, name: str, env: Mapping[str, str] | None = None) -> None:
    """Put (a duplicate of) ``fd`` into the store under ``name``."""
    notify(f"FDSTORE=1\nFDNAME={name}", [fd], env)


def remove(name: str, env: Mapping[str, str] | None = None) -> None:
    """Have systemd close the stored descriptors called ``name``."""
    notify(f"FDSTOREREMOVE=1\nFDNAME={name}", None, env)


def listen_fds(env: MutableMapping[str, str] | None = None) -> dict[str, list[int]]:
    """The descriptors systemd passed to this process, by name; consumed once.

    The variables are removed from the environment (children must not believe the
    descriptors are theirs) and each descriptor is made close-on-exec.
    """
    env = os.environ if env is None else env
    try:
        pid = int(env.get("LISTEN_PID", ""))
        n = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return {}
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    for var in _LISTEN_VARS:
        env.pop(var, None)
    if pid != os.getpid() or n <= 0:
        return {}
    out: dict[str, list[int]] = {}
    for i in range(n):
        fd = LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue  # (closed meanwhile: not ours to use)
        name = names[i] if i < len(names) and names[i] else "unknown"
        out.setdefault(name, []).append(fd)
    return out
