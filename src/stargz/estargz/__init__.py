"""The eStargz format: TOC model, footers, reader and writer.

A leaf package: it sees blobs only through ``read_at(offset, size)`` callables and file
objects, and never imports FUSE, gRPC, HTTP or asyncio code.

Its names are loaded on first use: the reader side (``stargz.estargz.reader``) does not
load the writer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stargz.estargz.footer import Footer, parse_footer
    from stargz.estargz.reader import Node, Reader, open_file
    from stargz.estargz.toc import TOC, TOCEntry, clean_name, dump_toc, parse_toc
    from stargz.estargz.writer import BuildResult, build

#: Where each name lives (imported on first use, see `__getattr__`).
_EXPORTS = {
    "Footer": "stargz.estargz.footer",
    "parse_footer": "stargz.estargz.footer",
    "Node": "stargz.estargz.reader",
    "Reader": "stargz.estargz.reader",
    "open_file": "stargz.estargz.reader",
    "TOC": "stargz.estargz.toc",
    "TOCEntry": "stargz.estargz.toc",
    "clean_name": "stargz.estargz.toc",
    "dump_toc": "stargz.estargz.toc",
    "parse_toc": "stargz.estargz.toc",
    "BuildResult": "stargz.estargz.writer",
    "build": "stargz.estargz.writer",
}


def __getattr__(name: str) -> Any:
    """Load the submodule that defines ``name`` on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "TOC",
    "BuildResult",
    "Footer",
    "Node",
    "Reader",
    "TOCEntry",
    "build",
    "clean_name",
    "dump_toc",
    "open_file",
    "parse_footer",
    "parse_toc",
]
