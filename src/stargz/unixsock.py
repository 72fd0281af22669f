"""Is anything serving this unix socket? One clear sentence instead of gRPC's retries.

gRPC dials a missing or dead socket with back-off and then says only "failed to connect
to all addresses"; the command-line clients (``stargz status``, ``stargz rpull``) ask
first and name the problem.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

from stargz.errors import Unavailable


def probe(address: str, server: str, *, stale: str = "nothing listens on it") -> None:
    """Raise :class:`Unavailable` naming ``server`` (e.g. "containerd") and why, unless
    ``address`` is a socket that accepts a connection. ``stale``: what to say when the file
    is there and nobody listens."""

    def unreachable(why: str) -> Unavailable:
        return Unavailable(f"cannot reach {server} at {address}: {why}")

    try:
        st = os.stat(address)
    except FileNotFoundError:
        raise unreachable(f"no such socket (is {server} running?)") from None
    except PermissionError:
        raise unreachable("permission denied (the socket is root-only)") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise unreachable("not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(address)
        except ConnectionRefusedError:
            raise unreachable(stale) from None
        except PermissionError:
            raise unreachable("permission denied (the socket is root-only)") from None
        except OSError as e:
            raise unreachable(os.strerror(e.errno or errno.EIO)) from None
