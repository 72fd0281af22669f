"""The daemon's gRPC server on a unix socket: wiring a Snapshotter and its FileSystem (the
lazy FUSE filesystem, or None when every layer is unpacked) to containerd, plus our own
read-only ``stargz.v1.Status`` service for ``stargz status`` (`stargz.service.status`) and
``stargz.v1.Pull``, the pull ``stargz rpull`` asks the daemon to make (`stargz.service.pull`).

Socket rules: the socket's directory, when the daemon creates it, is 0700, and the socket
is 0600, so only root (containerd) can talk to it. A stale socket file left by a crash is
replaced; a socket that still answers belongs to a running daemon and is left alone.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable, Sequence

import grpc

from stargz.errors import FailedPrecondition
from stargz.snapshot import FileSystem, Snapshotter

from . import pull, status
from .proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from .snapshots import SnapshotsService

log = logging.getLogger("stargz.service")

#: gRPC message size limits containerd uses for its own server (16 MiB).
MAX_MESSAGE_BYTES = 16 << 20


def _socket_in_use(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        return False
    finally:
        s.close()
    return True


def prepare_socket_path(address: str) -> None:
    """Create the socket's directory (0700) and clear a stale socket at ``address``.

    An existing directory keeps its mode: it may be shared (``/run``)."""
    directory = os.path.dirname(address) or "."
    if not os.path.isdir(directory):
        os.makedirs(directory, 0o700, exist_ok=True)
        os.chmod(directory, 0o700)  # makedirs' mode is subject to the umask
    try:
        st = os.lstat(address)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FailedPrecondition(f"{address} exists and is not a socket")
    if _socket_in_use(address):
        raise FailedPrecondition(f"{address} is in use by another process")
    os.unlink(address)


async def serve_unix(
    address: str,
    handlers: Sequence[grpc.GenericRpcHandler] = (),
    register: Callable[[grpc.aio.Server], None] | None = None,
) -> grpc.aio.Server:
    """A started gRPC server on unix socket ``address`` (born 0600; its directory 0700
    when created here), serving ``handlers`` and whatever ``register`` adds."""
    address = os.path.abspath(address)
    prepare_socket_path(address)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    if register is not None:
        register(server)
    if handlers:
        server.add_generic_rpc_handlers(tuple(handlers))
    old_umask = os.umask(0o177)
    try:
        if server.add_insecure_port(f"unix:{address}") == 0:
            raise OSError(errno.EADDRINUSE, f"cannot listen on {address}")
        await server.start()
    finally:
        os.umask(old_umask)
    os.chmod(address, 0o600)
    return server


class Server:
    """A running daemon: the snapshotter and the gRPC server in front of it."""

    def __init__(self, address: str, snapshotter: Snapshotter, server: grpc.aio.Server) -> None:
        self.address = address
        self.snapshotter = snapshotter
        self.grpc = server

    @classmethod
    async def start(
        cls,
        address: str,
        root: str,
        fs: FileSystem | None = None,
        *,
        allow_invalid_mounts_on_restart: bool = False,
        extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
    ) -> Server:
        """Open the snapshotter on ``root`` and serve it on ``address``, with the services
        of ``extra_handlers`` on the same socket (the CRI image service, by default)."""
        address = os.path.abspath(address)
        snapshotter = await Snapshotter.open(
            root, fs, allow_invalid_mounts_on_restart=allow_invalid_mounts_on_restart
        )

        def register(server: grpc.aio.Server) -> None:
            pb_grpc.add_SnapshotsServicer_to_server(SnapshotsService(snapshotter), server)
            status.add_to_server(server, snapshotter, fs)  # `stargz status`, same socket
            pull.add_to_server(server, fs)  # `stargz rpull`, same socket

        try:
            server = await serve_unix(address, extra_handlers, register)
        except BaseException:
            await snapshotter.close()
            raise
        log.info("serving", extra={"address": address, "root": snapshotter.root})
        return cls(address, snapshotter, server)

    async def stop(self, grace: float | None = 30.0, *, unmount_remote: bool = False) -> None:
        """Stop accepting calls, let in-flight calls finish (up to ``grace`` seconds),
        close the snapshotter and remove the socket."""
        await self.grpc.stop(grace)
        await self.snapshotter.close(unmount_remote=unmount_remote)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)
