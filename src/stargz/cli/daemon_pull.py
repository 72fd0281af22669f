"""``stargz rpull`` through the running daemon: ask its ``stargz.v1.Pull`` and read the events.

This module is the whole of what ``stargz rpull`` loads on its usual path, so it imports
grpc, the generated ``stargz.v1.Pull`` code and the standard library only: no registry
client (aiohttp), no containerd stubs, no config. A test runs the command and checks
that list (tests/cli/test_rpull_imports.py).

:class:`NoDaemon` means "nobody here can pull for us" (no socket, a stale one, or a daemon
that predates the service) and nothing was started: the caller pulls in its own process.
Any other failure is the pull's own and is raised as a :mod:`stargz.errors` kind with the
daemon's one-line message.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from stargz.errors import StargzError, Unavailable
from stargz.service.errors import ERROR_CODES
from stargz.service.proto.stargz.v1 import pull_pb2 as pb
from stargz.service.proto.stargz.v1 import pull_pb2_grpc as pb_grpc
from stargz.unixsock import probe

#: gRPC code -> (error kind, the class text the daemon appends to its messages), read from
#: the daemon's own table (a leaf module: grpc and `stargz.errors` only).
_KINDS: dict[grpc.StatusCode, tuple[type[StargzError], str]] = {
    code: (cls, text) for cls, code, text in ERROR_CODES if issubclass(cls, StargzError)
}


class NoDaemon(Exception):
    """No daemon pulls for us at this address (the message says why); nothing was done."""


@dataclass(frozen=True)
class Request:
    ref: str
    containerd_address: str
    namespace: str
    snapshotter: str
    plain_http: bool = False
    username: str = ""
    password: str = ""
    platform: str = ""


def _error(address: str, e: grpc.RpcError) -> StargzError:
    """The daemon's one-line message as its error kind. The daemon ends every message of
    a known kind with the kind's text (``...: unavailable``), which is dropped here; a
    message without it comes from gRPC itself (the daemon went away mid-pull, say) and
    is said to be about the daemon."""
    code = e.code()  # type: ignore[attr-defined]
    details = " ".join(str(e.details() or "").split())  # type: ignore[attr-defined]
    kind, text = _KINDS.get(code, (StargzError, ""))
    if text and details.endswith(": " + text):
        return kind(details[: -len(text) - 2])
    if text or code == grpc.StatusCode.CANCELLED or not details:
        return kind(f"the stargz daemon at {address}: {code.name} {details}".rstrip())
    return kind(details)


def pull(address: str, req: Request) -> Iterator[pb.PullEvent]:
    """The daemon's events for one pull, ending with ``done``. Raises :class:`NoDaemon`
    before anything happened, or the pull's error as a :mod:`stargz.errors` kind."""
    address = os.path.abspath(address)
    try:
        probe(address, "the stargz daemon", stale="nothing listens on it (a stale socket)")
    except Unavailable as e:
        raise NoDaemon(str(e)) from None
    request = pb.PullRequest(
        ref=req.ref,
        containerd_address=os.path.abspath(req.containerd_address),
        namespace=req.namespace,
        snapshotter=req.snapshotter,
        plain_http=req.plain_http,
        username=req.username,
        password=req.password,
        platform=req.platform,
    )
    started = False
    with grpc.insecure_channel(f"unix:{address}") as channel:
        try:
            for event in pb_grpc.PullStub(channel).Pull(request):
                started = True
                yield event
        except grpc.RpcError as e:
            if not started and e.code() == grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
                raise NoDaemon(
                    f"the stargz daemon at {address} does not serve stargz.v1.Pull "
                    "(a daemon older than this tool?)"
                ) from None
            raise _error(address, e) from None
