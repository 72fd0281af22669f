"""``stargz trace ls`` / ``stargz trace show``: what the daemon recorded with ``[trace]
enable = true`` (the files containers opened first, per image), read from the daemon
root (root only: it is 0700)."""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys

from stargz.errors import NotFound


def _root_trace_dir(root: str) -> str:
    from stargz.fs.trace import TRACE_DIR

    d = os.path.join(root, TRACE_DIR)
    if not os.path.isdir(d):
        raise NotFound(f"no traces under {root!r} (is [trace] enable = true in the config?)")
    return d


def cmd_ls(args: argparse.Namespace) -> int:
    from stargz.fs.trace import TRACE_SUFFIX, read_trace

    d = _root_trace_dir(args.root)
    rows = []
    for name in sorted(os.listdir(d)):
        if not name.endswith(TRACE_SUFFIX):
            continue
        path = os.path.join(d, name)
        entries = read_trace(path)
        if not entries:
            continue
        when = datetime.datetime.fromtimestamp(os.stat(path).st_mtime, datetime.UTC)
        rows.append(
            {
                "ref": entries[0]["ref"],
                "layers": len({e["layerDigest"] for e in entries}),
                "files": len(entries),
                "updated": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "file": path,
            }
        )
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{'REF':40}  {'LAYERS':>6}  {'FILES':>6}  {'UPDATED':20}  FILE")
    for r in rows:
        print(f"{r['ref']:40}  {r['layers']:>6}  {r['files']:>6}  {r['updated']:20}  {r['file']}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from stargz.fs.trace import read_trace, trace_file_name

    path = args.image
    if not os.path.isfile(path):
        path = os.path.join(_root_trace_dir(args.root), trace_file_name(args.image))
        if not os.path.isfile(path):
            raise NotFound(f"no trace of {args.image!r} under {args.root!r}")
    entries = read_trace(path)
    if args.json:
        for e in entries:
            print(json.dumps(e, separators=(",", ":")))
        return 0
    by_layer = collections.OrderedDict[str, list[str]]()
    for e in entries:
        by_layer.setdefault(e["layerDigest"], []).append(e["path"])
    if entries:
        print(entries[0]["ref"])
    for layer, paths in by_layer.items():
        print(f"  layer {layer}")
        for p in paths:
            print(f"    {p}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from stargz.cli.daemon import DEFAULT_ROOT

    t = sub.add_parser("trace", help="list and show the daemon's recorded file accesses")
    tsub = t.add_subparsers(dest="trace_cmd", required=True)
    ls = tsub.add_parser("ls", help="one line per traced image")
    show = tsub.add_parser("show", help="the files one image's containers opened, in order")
    show.add_argument("image", metavar="REF|FILE", help="image reference, or a trace file")
    for p in (ls, show):
        p.add_argument("--root", default=DEFAULT_ROOT, help=f"daemon root (default {DEFAULT_ROOT})")
        p.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)
    show.set_defaults(func=cmd_show)
