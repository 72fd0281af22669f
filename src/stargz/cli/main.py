"""The ``stargz`` command: convert images (OCI layouts or registries), extract or inspect
eStargz layers (files, or layers of images), and show what the running daemon is doing
(``stargz status``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from stargz.cli.version import VersionAction
from stargz.errors import StargzError

if TYPE_CHECKING:
    from stargz.estargz.reader import Reader

#: The subcommands in the order ``--help`` lists them, and the module whose
#: ``add_parser(sub)`` adds each ("" for the layer commands of this module). Only the
#: named command's module is imported: ``stargz rpull`` or ``stargz status`` should not
#: start by loading the converter, the TOC reader and the doctor (``stargz --help``, or a
#: name that is no command, loads them all).
COMMANDS: tuple[tuple[str, str], ...] = (
    ("convert", "stargz.cli.convert"),
    ("extract", ""),
    ("get-toc-digest", ""),
    ("inspect", ""),
    ("status", "stargz.cli.status"),
    ("rpull", "stargz.cli.rpull"),
    ("doctor", "stargz.cli.doctor"),
    ("optimize", "stargz.cli.optimize"),
    ("trace", "stargz.cli.trace"),
)


def _open(args: argparse.Namespace) -> Reader:
    from stargz.estargz import reader as esgz_reader

    if getattr(args, "layer", False) is not False:  # get-toc-digest, inspect: images too
        from stargz.cli.layerref import open_layer

        return open_layer(args)
    return esgz_reader.open_file(
        args.blob, toc_digest=getattr(args, "toc_digest", None), verify=not args.no_verify
    )


def cmd_extract(args: argparse.Namespace) -> int:
    from stargz.estargz.extract import extract

    with _open(args) as r:
        n = extract(r, args.dir)
    print(f"extracted {n} entries into {args.dir}", file=sys.stderr)
    return 0


def cmd_get_toc_digest(args: argparse.Namespace) -> int:
    with _open(args) as r:
        if args.dump_toc:
            from stargz.estargz.toc import dump_toc

            sys.stdout.write(dump_toc(r.toc).decode())
            sys.stdout.write("\n")
        else:
            print(r.toc_digest)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import collections
    import json

    with _open(args) as r:
        types = collections.Counter(e.type for e in r.toc.entries)
        info = {
            "format": {"gzip": "estargz", "legacy": "stargz", "zstd": "zstd:chunked"}[
                r.footer.kind
            ],
            "blob_size": r.blob_size,
            "toc_digest": r.toc_digest,
            "toc_offset": r.footer.toc_offset,
            "entries": len(r.toc.entries),
            "entry_types": dict(sorted(types.items())),
            "chunks": len(r.chunks),
            "files_size": sum(n.entry.size for n in r.nodes if n.type == "reg"),
            "landmark": r.landmark,
            "prefetch_size": r.prefetch_size,
        }
        if args.json:
            info["files"] = [
                {
                    "path": path,
                    "type": node.type,
                    "mode": node.entry.mode,
                    "size": node.entry.size,
                    "chunks": len(r.chunk_rows(node.id, 0, node.entry.size))
                    if node.type == "reg"
                    else 0,
                }
                for path, node in r.walk()
                if path
            ]
            json.dump(info, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            for k, v in info.items():
                print(f"{k:14} {v}")
    return 0


def _named_command(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names, if it is one (the top level has no option that
    takes a value, so it is the first word that is not an option)."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if any(word == name for name, _ in COMMANDS) else None


def _add_layer_command(sub: argparse._SubParsersAction, name: str) -> None:
    func, helptext = {
        "extract": (cmd_extract, "materialize a layer through its TOC, verifying every chunk"),
        "get-toc-digest": (cmd_get_toc_digest, "print the TOC digest of a layer"),
        "inspect": (cmd_inspect, "show entries, chunks, sizes and the prefetch landmark"),
    }[name]
    s = sub.add_parser(name, help=helptext)
    if name == "extract":
        s.add_argument("blob", metavar="BLOB")
    else:
        s.add_argument(
            "blob",
            metavar="BLOB|IMAGE",
            help="a blob file, or an image: oci:DIR[:TAG], REGISTRY/REPO:TAG, docker://REF",
        )
        from stargz.cli import layerref

        layerref.add_arguments(s)
    if name == "extract":
        s.add_argument("dir", metavar="DIR")
    if name != "get-toc-digest":
        s.add_argument("--toc-digest", metavar="D", help="verify the TOC against this digest")
    else:
        s.add_argument("--dump-toc", action="store_true", help="print the TOC JSON instead")
    if name == "inspect":
        s.add_argument("--json", action="store_true")
    s.add_argument("--no-verify", action="store_true", help="allow blobs without chunk digests")
    s.set_defaults(func=func)


def parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line; with ``argv``, only the subcommand it names (see `COMMANDS`)."""
    p = argparse.ArgumentParser(prog="stargz", description=__doc__)
    p.add_argument("--version", action=VersionAction)
    sub = p.add_subparsers(dest="cmd", required=True)
    only = _named_command(argv) if argv is not None else None
    for name, module in COMMANDS:
        if only is not None and name != only:
            continue
        if module:
            # (``__import__``, not importlib: ``-X importtime`` lists only what goes through
            # the import statement's machinery, and the commands' start-up is measured so)
            __import__(module, fromlist=["add_parser"]).add_parser(sub)
        else:
            _add_layer_command(sub, name)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except StargzError as e:
        print(f"stargz: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f": {e.filename!r}" if e.filename else ""
        print(f"stargz: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
