"""``stargz rpull``: ask containerd for a lazy pull, as ``ctr-remote i rpull`` does.

    stargz rpull [--address SOCK] [--namespace NS] [--snapshotter NAME] [--plain-http]
                 [--user USER[:PASSWORD]] [--platform OS/ARCH[/VARIANT]]
                 [--daemon-address SOCK | --in-process] REF

Each layer the snapshotter can mount from the registry becomes a remote snapshot
(nothing downloaded); the others are pulled and unpacked by containerd as usual. Then
``ctr run --snapshotter stargz REF ...`` starts a container without pulling again.
Errors are one line on stderr and exit status 1.

The running stargz daemon makes the pull (``stargz.v1.Pull`` on its socket): it has the
registry client loaded and warm, and this process only prints what it streams back
(`stargz.cli.daemon_pull`). Without a daemon at ``--daemon-address`` (no socket, a stale
one, or a daemon without the service) the pull runs in this process instead, as it does
with ``--in-process``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from stargz.errors import InvalidArgument, Unavailable

#: containerd's socket and namespace; ``ctr`` reads the same environment variables.
DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "default"
DEFAULT_SNAPSHOTTER = "stargz"
#: The daemon's ``--address`` default (`stargz.cli.daemon.DEFAULT_ADDRESS`; a test keeps
#: them equal; not imported from there, for the same reason as `stargz.cli.status`).
DEFAULT_DAEMON_ADDRESS = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock"

Say = Callable[[str], Any]


def add_parser(sub: Any) -> None:
    s = sub.add_parser(
        "rpull",
        help="pull an image into containerd, lazily where the snapshotter can (ctr-remote i rpull)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    s.add_argument("ref", metavar="REF", help="image reference, e.g. registry:5000/app:tag")
    s.add_argument(
        "-a",
        "--address",
        default=os.environ.get("CONTAINERD_ADDRESS") or DEFAULT_ADDRESS,
        help=f"containerd's socket (default $CONTAINERD_ADDRESS or {DEFAULT_ADDRESS})",
    )
    s.add_argument(
        "-n",
        "--namespace",
        default=os.environ.get("CONTAINERD_NAMESPACE") or DEFAULT_NAMESPACE,
        help=f"containerd namespace (default $CONTAINERD_NAMESPACE or {DEFAULT_NAMESPACE})",
    )
    s.add_argument(
        "--snapshotter",
        default=DEFAULT_SNAPSHOTTER,
        help=f"snapshotter to unpack into (default {DEFAULT_SNAPSHOTTER})",
    )
    s.add_argument(
        "--plain-http",
        action="store_true",
        help="plain http to the registry (automatic for localhost and 127.0.0.1)",
    )
    s.add_argument(
        "-u",
        "--user",
        metavar="USER[:PASSWORD]",
        help="registry credentials for this pull (asked for the password when it is left "
        "out); without them the daemon's keychain applies (its docker config, the CRI "
        "keychain), or in this process ~/.docker/config.json",
    )
    s.add_argument("--platform", help="os/arch[/variant] to pull (default: this host's)")
    where = s.add_mutually_exclusive_group()
    where.add_argument(
        "--daemon-address",
        metavar="SOCK",
        default=DEFAULT_DAEMON_ADDRESS,
        help="the stargz daemon's socket: it makes the pull, this process prints its "
        f"progress (default {DEFAULT_DAEMON_ADDRESS}; without a daemon there, the pull "
        "runs in this process)",
    )
    where.add_argument(
        "--in-process",
        action="store_true",
        help="pull in this process, without asking the daemon",
    )
    s.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    s.set_defaults(func=cmd_rpull)


def user_password(user: str | None) -> tuple[str, str] | None:
    """``--user USER[:PASSWORD]`` as (user, password), asking for a left-out password."""
    if user is None:
        return None
    name, sep, password = user.partition(":")
    if not name:
        raise InvalidArgument("--user: empty user name")
    if not sep:
        if not sys.stdin.isatty():
            raise InvalidArgument("--user: no password (give USER:PASSWORD, or run on a terminal)")
        import getpass

        password = getpass.getpass("Password: ")
    return name, password


# --- what the command prints (the same on both paths) -------------------------------------


def resolved_line(ref: str, digest: str, media_type: str) -> str:
    return f"resolved {ref} -> {digest} ({media_type})"


def manifest_line(digest: str, layers: int) -> str:
    return f"manifest {digest}, {layers} layer(s)"


def layer_line(index: int, digest: str, how: str, fetched: int) -> str:
    text = {"lazy": "remote snapshot (lazy)", "present": "already unpacked"}.get(
        how, f"unpacked ({fetched} bytes fetched)"
    )
    return f"layer {index + 1}: {digest}: {text}"


def done_line(name: str, snapshotter: str, lazy: int, layers: int, seconds: float) -> str:
    return (
        f"pulled {name} into snapshotter {snapshotter}: {lazy} of "
        f"{layers} layer(s) lazy, in {seconds:.2f}s"
    )


# --- the two paths ---------------------------------------------------------------------


def cmd_rpull(args: argparse.Namespace) -> int:
    say: Say = (lambda _: None) if args.quiet else print
    creds = user_password(args.user)
    if not args.in_process:
        from stargz.cli import daemon_pull  # grpc and the stargz.v1.Pull stubs only

        try:
            return via_daemon(args, creds, say, daemon_pull)
        except daemon_pull.NoDaemon as e:
            if not args.quiet:
                print(f"stargz: {e}; pulling in this process", file=sys.stderr)
    return in_process(args, creds, say)


def via_daemon(
    args: argparse.Namespace, creds: tuple[str, str] | None, say: Say, daemon_pull: Any
) -> int:
    """The pull made by the daemon at ``--daemon-address``; its events printed."""
    req = daemon_pull.Request(
        ref=args.ref,
        containerd_address=args.address,
        namespace=args.namespace,
        snapshotter=args.snapshotter,
        plain_http=args.plain_http,
        username=creds[0] if creds else "",
        password=creds[1] if creds else "",
        platform=args.platform or "",
    )
    layers: list[str] = []
    done = False
    for ev in daemon_pull.pull(args.daemon_address, req):
        kind = ev.WhichOneof("event")
        if kind == "resolved":
            say(resolved_line(ev.resolved.ref, ev.resolved.digest, ev.resolved.media_type))
        elif kind == "manifest":
            say(manifest_line(ev.manifest.digest, ev.manifest.layers))
        elif kind == "layer":
            x = ev.layer
            layers.append(x.how)
            say(layer_line(x.index, x.digest, x.how, x.fetched))
        elif kind == "done":
            done = True
            lazy = layers.count("lazy")
            say(done_line(ev.done.name, args.snapshotter, lazy, len(layers), ev.done.seconds))
    if not done:
        raise Unavailable(f"the stargz daemon at {args.daemon_address} ended the pull unfinished")
    return 0


def in_process(args: argparse.Namespace, creds: tuple[str, str] | None, say: Say) -> int:
    """The pull made here (`stargz.containerd.pull`), as before there was a daemon to ask."""
    import asyncio

    from stargz.containerd.pull import PullOptions, rpull
    from stargz.remote.auth import Credentials
    from stargz.remote.manifest import Platform

    opts = PullOptions(
        address=args.address,
        namespace=args.namespace,
        snapshotter=args.snapshotter,
        plain_http=args.plain_http,
        credentials=Credentials(username=creds[0], password=creds[1]) if creds else None,
        platform=Platform.parse(args.platform) if args.platform else None,
    )

    def fetched(image: Any) -> None:
        t = image.target
        say(resolved_line(str(image.ref), t.digest, t.media_type))
        say(manifest_line(image.manifest.desc.digest, len(image.layers)))

    def layer(res: Any) -> None:
        say(layer_line(res.index, res.digest, res.how, res.fetched))

    result = asyncio.run(rpull(args.ref, opts, on_layer=layer, on_fetched=fetched))
    lazy = sum(1 for r in result.layers if r.how == "lazy")
    say(done_line(result.name, args.snapshotter, lazy, len(result.layers), result.seconds))
    return 0
