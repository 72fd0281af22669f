"""``stargz optimize SRC DST``: run a workload on an image and convert it with the files
the workload opened first in each layer (Go's ``ctr-remote i optimize``, without
containerd: our FUSE filesystem observes the opens, runc runs the workload).

SRC and DST take the forms ``stargz convert`` takes (OCI layout or registry reference);
a registry source's layers are downloaded into a scratch dir removed at the end."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator

from stargz.errors import InvalidArgument
from stargz.estargz import writer


def _json_list(flag: str, text: str | None) -> list[str] | None:
    if text is None:
        return None
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise InvalidArgument(f"{flag} must be a JSON array of strings: {e}") from None
    if not isinstance(doc, list) or not all(isinstance(x, str) for x in doc):
        raise InvalidArgument(f"{flag} must be a JSON array of strings, got {text!r}")
    return doc


def cmd_optimize(args: argparse.Namespace) -> int:
    from stargz.image.convert import ConvertOptions
    from stargz.optimize.run import OptimizeOptions, optimize, optimize_from_trace
    from stargz.optimize.spec import WorkloadOptions

    copts = ConvertOptions(
        compression="zstd" if args.zstdchunked else "gzip",
        chunk_size=args.chunk_size,
        level=args.compression_level,
        plain_http=args.plain_http,
    )
    platform = args.platform
    events = _events(args.quiet)
    if args.from_trace:
        with _term_is_interrupt():
            res = optimize_from_trace(
                args.src,
                args.dst,
                args.from_trace,
                copts,
                args.record_out,
                platform=platform,
                events=events,
            )
        _summary(res)
        return 0

    for e in args.env:
        if "=" not in e or e.startswith("="):
            raise InvalidArgument(f"--env {e!r} must look like NAME=VALUE")
    if args.terminal and args.wait_on_signal:
        raise InvalidArgument("--wait-on-signal cannot be used with --terminal")
    wl = WorkloadOptions(
        entrypoint=_json_list("--entrypoint", args.entrypoint),
        args=_json_list("--args", args.args),
        env=list(args.env),
        cwd=args.cwd,
        user=args.user,
        terminal=args.terminal,
        net_host=args.net_host,
    )
    opts = OptimizeOptions(
        workload=wl,
        period=args.period,
        wait_on_signal=args.wait_on_signal,
        record_out=args.record_out,
        convert=copts,
        platform=platform,
    )
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="stargz: %(levelname)s: %(message)s")
    with _term_is_interrupt():
        res = optimize(args.src, args.dst, opts, events=events)
    if res.timed_out:
        print(f"stargz: workload stopped after --period {args.period:g}s", file=sys.stderr)
    elif res.exit_status not in (0, None):
        print(
            f"stargz: warning: the workload exited with status {res.exit_status}; "
            "the image is optimized for what it opened before that",
            file=sys.stderr,
        )
    _summary(res)
    return 0


@contextlib.contextmanager
def _term_is_interrupt() -> Iterator[None]:
    """SIGTERM ends the run as Ctrl-C does, so its scratch dir (downloads, converted
    layers) is removed and no tag is written, instead of the process just dying."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _events(quiet: bool):  # type: ignore[no-untyped-def]
    """One line per layer step on stderr (no bars: the workload may own the terminal)."""
    from stargz.image.progress import NO_EVENTS

    if quiet:
        return NO_EVENTS
    from stargz.cli.progress import LogLines

    return LogLines(sys.stderr)


def _summary(res) -> None:
    for i, files in sorted(res.layer_files.items()):
        print(f"layer {i}: {len(files)} file(s) prioritized", file=sys.stderr)
    print(res.descriptor["digest"])


def add_parser(sub: argparse._SubParsersAction) -> None:
    o = sub.add_parser(
        "optimize",
        help="run a workload on an image and put the files it opens first in each layer",
        description=__doc__,
    )
    o.add_argument(
        "src",
        metavar="SRC",
        help="image: oci:DIR[:TAG], REGISTRY/REPO:TAG, ...@sha256:, docker://REF",
    )
    o.add_argument("dst", metavar="DST", help="where to write it (a layout or registry tag)")
    o.add_argument("--entrypoint", metavar="JSON", help='entrypoint, e.g. \'["/bin/sh","-c"]\'')
    o.add_argument("--args", metavar="JSON", help="arguments (the image's cmd), a JSON array")
    o.add_argument("--env", metavar="K=V", action="append", default=[], help="add/override")
    o.add_argument("--cwd", help="working directory (default: the image's)")
    o.add_argument("--user", help="user[:group], names or ids (default: the image's)")
    o.add_argument("--terminal", "-t", action="store_true", help="give the workload a terminal")
    o.add_argument(
        "--wait-on-signal",
        action="store_true",
        help="run until the workload exits or Ctrl-C (ignores --period)",
    )
    o.add_argument(
        "--period", type=float, default=10.0, metavar="SECONDS", help="time to run (default 10)"
    )
    o.add_argument("--record-out", metavar="FILE", help="write the access record (JSON lines)")
    o.add_argument(
        "--from-trace",
        metavar="DIR|FILE",
        help="re-order from a daemon trace ([trace] enable; a trace file, or the daemon root) "
        "instead of running a workload",
    )
    o.add_argument("--zstdchunked", action="store_true", help="write zstd:chunked layers")
    o.add_argument("--oci", action="store_true", help="OCI media types (always: accepted for Go)")
    o.add_argument("--net-host", action="store_true", help="share the host's network")
    o.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        help="the platform to take from an index (default: this machine's)",
    )
    o.add_argument(
        "--plain-http",
        action="store_true",
        help="http to the registries (automatic for localhost and 127.0.0.1)",
    )
    o.add_argument("-q", "--quiet", action="store_true", help="no per-layer progress lines")
    o.add_argument("--chunk-size", type=int, default=writer.DEFAULT_CHUNK_SIZE)
    o.add_argument("--compression-level", type=int, default=None)
    o.set_defaults(func=cmd_optimize)
