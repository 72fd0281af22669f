"""``stargz convert SRC DST``: an image to eStargz / zstd:chunked, layout or registry.

Flags are spelled as Go's ``ctr-remote images convert`` spells them where it has them
(``--zstdchunked``, ``--estargz-chunk-size``, ``--estargz-compression-level``,
``--platform``, ``--all-platforms``, ``--plain-http``, ``--oci``); the shorter
``--chunk-size``/``--compression-level`` still work.
"""

from __future__ import annotations

import argparse
import sys
import time

from stargz.estargz import writer
from stargz.image.convert import DEFAULT_JOBS


def _prioritized(path: str | None) -> list[str]:
    if not path:
        return []
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def _record_in(src: str, path: str | None) -> dict[int, list[str]] | None:
    """Per-layer files from a ``--record-in`` record (Go's ``ctr-remote`` JSON lines)."""
    if not path:
        return None
    from stargz.image.refs import LayoutLocation, parse_location
    from stargz.optimize import record

    entries = record.read(path)
    if isinstance(parse_location(src), LayoutLocation):
        from stargz.image.source import source_image

        return record.layer_files(entries, len(source_image(src).layers))
    # a registry image is not fetched twice: a record of layer indexes (what Go and
    # `stargz optimize` write) is enough; an index past the image's layers is unused
    if any(e.layer_index is None for e in entries):
        from stargz.errors import InvalidArgument

        raise InvalidArgument(
            f"{path}: entries without layerIndex need an oci: source (to count its layers)"
        )
    return record.layer_files(entries, 1 + max((e.layer_index or 0) for e in entries))


def cmd_convert(args: argparse.Namespace) -> int:
    from stargz.image.convert import ConvertOptions, convert
    from stargz.remote.manifest import Platform

    opts = ConvertOptions(
        compression="zstd" if args.zstdchunked else "gzip",
        chunk_size=args.chunk_size,
        level=args.compression_level,
        prioritized_files=_prioritized(args.prioritized_files),
        workers=args.workers,
        platforms=[Platform.parse(p) for p in args.platform or []],
        reuse=not args.no_reuse,
        jobs=args.jobs,
        plain_http=args.plain_http,
        layer_files=_record_in(args.src, args.record_in),
    )
    start = time.perf_counter()
    events, bars = _events(args)
    try:
        desc, stats = convert(args.src, args.dst, opts, events=events)
    finally:
        if bars is not None:
            bars.close()
    total = time.perf_counter() - start
    print(desc["digest"])
    if not args.quiet:
        raw = sum(s.uncompressed_size for s in stats if not s.reused)
        reused = sum(1 for s in stats if s.reused)
        print(
            f"converted {len(stats) - reused} layer(s), kept {reused} already eStargz, "
            f"{raw} B uncompressed in {total:.2f}s",
            file=sys.stderr,
        )
    return 0


def _events(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from stargz.image.progress import NO_EVENTS

    if args.quiet:
        return NO_EVENTS, None
    from stargz.cli.progress import Bars, LogLines

    if sys.stderr.isatty():
        bars = Bars(sys.stderr)
        return bars, bars
    return LogLines(sys.stderr), None


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "convert",
        help="convert an image (OCI layout or registry) to eStargz",
        description=(
            "SRC and DST are oci:DIR[:TAG], DIR[:TAG], REGISTRY/REPO:TAG, "
            "REGISTRY/REPO@sha256:... or docker://REF. Every platform of an index is "
            "converted unless --platform picks; layers already eStargz are kept. The "
            "destination tag is written last."
        ),
    )
    c.add_argument("src", metavar="SRC", help="image to convert")
    c.add_argument("dst", metavar="DST", help="where to write it (a tag)")
    c.add_argument("--zstdchunked", action="store_true", help="write zstd:chunked layers")
    c.add_argument(
        "--chunk-size",
        "--estargz-chunk-size",
        dest="chunk_size",
        type=int,
        default=writer.DEFAULT_CHUNK_SIZE,
        help="bytes per chunk (default 4 MiB)",
    )
    c.add_argument(
        "--compression-level",
        "--estargz-compression-level",
        "--zstdchunked-compression-level",
        dest="compression_level",
        type=int,
        default=None,
        help="gzip 0-9 (0 stores; 1 ISA-L, the fastest; 2-9 libdeflate; default 5, about the "
        "size of Go's default 9) or zstd 1-22 (default 3)",
    )
    c.add_argument("--prioritized-files", metavar="FILE", help="file listing paths to put first")
    c.add_argument(
        "--record-in", metavar="FILE", help="prioritize what a --record-out record lists"
    )
    c.add_argument(
        "--workers",
        "--estargz-parallelism",
        dest="workers",
        type=int,
        default=None,
        help="compression threads per layer (default: cores)",
    )
    c.add_argument(
        "--jobs",
        type=int,
        default=DEFAULT_JOBS,
        help=f"layers converted at once (default {DEFAULT_JOBS})",
    )
    c.add_argument(
        "--platform",
        action="append",
        metavar="OS/ARCH[/VARIANT]",
        help="convert only this platform of an index (repeatable; default: all)",
    )
    c.add_argument(
        "--all-platforms", action="store_true", help="convert every platform (the default)"
    )
    c.add_argument(
        "--no-reuse", action="store_true", help="convert layers that already are eStargz too"
    )
    c.add_argument(
        "--plain-http",
        action="store_true",
        help="http to the registries (automatic for localhost and 127.0.0.1)",
    )
    c.add_argument("--oci", action="store_true", help="accepted for ctr-remote: output is OCI")
    c.add_argument("--estargz", action="store_true", help="accepted for ctr-remote: the default")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    c.set_defaults(func=cmd_convert)
