"""``stargz rpull``: ask containerd for a lazy pull, as ``ctr-remote i rpull`` does.

    stargz rpull [--address SOCK] [--namespace NS] [--snapshotter NAME] [--plain-http]
                 [--user USER[:PASSWORD]] [--platform OS/ARCH[/VARIANT]] REF

Each layer the snapshotter can mount from the registry becomes a remote snapshot
(nothing downloaded); the others are pulled and unpacked by containerd as usual. Then
``ctr run --snapshotter stargz REF ...`` starts a container without pulling again.
Errors are one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from typing import Any

from stargz.errors import InvalidArgument

#: containerd's socket and namespace; ``ctr`` reads the same environment variables.
DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "default"
DEFAULT_SNAPSHOTTER = "stargz"


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
        help="registry credentials (asked for the password when it is left out)",
    )
    s.add_argument("--platform", help="os/arch[/variant] to pull (default: this host's)")
    s.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    s.set_defaults(func=cmd_rpull)


def credentials(user: str | None) -> Any:
    from stargz.remote.auth import Credentials

    if user is None:
        return None
    name, sep, password = user.partition(":")
    if not name:
        raise InvalidArgument("--user: empty user name")
    if not sep:
        if not sys.stdin.isatty():
            raise InvalidArgument("--user: no password (give USER:PASSWORD, or run on a terminal)")
        password = getpass.getpass("Password: ")
    return Credentials(username=name, password=password)


def cmd_rpull(args: argparse.Namespace) -> int:
    from stargz.containerd.pull import PullOptions, rpull
    from stargz.remote.manifest import Platform

    opts = PullOptions(
        address=args.address,
        namespace=args.namespace,
        snapshotter=args.snapshotter,
        plain_http=args.plain_http,
        credentials=credentials(args.user),
        platform=Platform.parse(args.platform) if args.platform else None,
    )
    say = (lambda _: None) if args.quiet else print

    def fetched(image: Any) -> None:
        say(f"resolved {image.ref} -> {image.target.digest} ({image.target.media_type})")
        say(f"manifest {image.manifest.desc.digest}, {len(image.layers)} layer(s)")

    def layer(res: Any) -> None:
        how = {"lazy": "remote snapshot (lazy)", "present": "already unpacked"}.get(
            res.how, f"unpacked ({res.fetched} bytes fetched)"
        )
        say(f"layer {res.index + 1}: {res.digest}: {how}")

    result = asyncio.run(rpull(args.ref, opts, on_layer=layer, on_fetched=fetched))
    lazy = sum(1 for r in result.layers if r.how == "lazy")
    say(
        f"pulled {result.name} into snapshotter {args.snapshotter}: {lazy} of "
        f"{len(result.layers)} layer(s) lazy, in {result.seconds:.2f}s"
    )
    return 0
