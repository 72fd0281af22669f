"""What every check of ``stargz doctor`` returns and shares: the finding, the options, and
whether something answers on a unix socket."""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass

from stargz import config as daemon_config
from stargz.cli.status import DEFAULT_ADDRESS

from . import containerd_config as ccfg

#: The daemon's ``--root`` default (`stargz.cli.daemon.DEFAULT_ROOT`; a test keeps them
#: equal; not imported from there, which would load the registry client).
DEFAULT_ROOT = "/var/lib/containerd-stargz-grpc"
#: The name containerd knows the snapshotter by (``ctr-remote``'s default too).
SNAPSHOTTER = "stargz"
DEFAULT_MIN_FREE = 1 << 30
DEFAULT_TIMEOUT = 5.0
#: The first kernel with FUSE passthrough (``CONFIG_FUSE_PASSTHROUGH``).
PASSTHROUGH_KERNEL = (6, 9)

OK, INFO, WARN, FAIL = "ok", "info", "warn", "fail"


@dataclass(frozen=True)
class Check:
    """One finding: ``name`` is stable (scripts key on it), ``fix`` is what to do ("" if
    nothing)."""

    name: str
    status: str
    message: str
    fix: str = ""


@dataclass(frozen=True)
class Options:
    containerd_config: str = ccfg.DEFAULT_PATH
    config: str = daemon_config.DEFAULT_CONFIG_PATH
    address: str = DEFAULT_ADDRESS
    #: None: the root the running daemon reports, else `DEFAULT_ROOT`.
    root: str | None = None
    min_free: int = DEFAULT_MIN_FREE
    timeout: float = DEFAULT_TIMEOUT


def socket_problem(path: str) -> str | None:
    """Why nothing answers on unix socket ``path`` (None: something accepts connections)."""

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path} does not exist"
    except PermissionError:
        return f"{path}: permission denied (run as root)"
    if not stat.S_ISSOCK(st.st_mode):
        return f"{path} is not a socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        try:
            s.connect(path)
        except ConnectionRefusedError:
            return f"nothing listens on {path} (a stale socket: the process is gone)"
        except PermissionError:
            return f"{path}: permission denied (run as root)"
        except OSError as e:
            return f"{path}: {e.strerror or e}"
    return None
