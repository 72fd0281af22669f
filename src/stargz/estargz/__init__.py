"""The eStargz format: TOC model, footers, reader and writer.

A leaf package: it sees blobs only through ``read_at(offset, size)`` callables and file
objects, and never imports FUSE, gRPC, HTTP or asyncio code.
"""

from stargz.estargz.footer import Footer, parse_footer
from stargz.estargz.reader import Node, Reader, open_file
from stargz.estargz.toc import TOC, TOCEntry, clean_name, dump_toc, parse_toc
from stargz.estargz.writer import BuildResult, build

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
