"""Hostile TOCs: small inputs that once cost gigabytes, logged tracebacks or steered
overlayfs, each with the error it must get now. Seeds for a fuzzer: `SEEDS` (TOC entries,
`toc_json`) and `BLOB_SEEDS` (the TOC's framing in a blob: `BlobSeed.make`).

Every seed is a TOC ``entries`` list and the error (type, message pattern) opening it
must raise, the same from both TOC builders (native and pure Python) and through a whole
blob (`tests/estargz/test_hostile.py`). `ACCEPTED` holds inputs just inside each limit:
they must open, identically in both builders.
"""

from __future__ import annotations

import gzip
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zstandard

from stargz.errors import TOCError
from stargz.estargz.footer import gzip_footer, skippable_frame, zstd_footer_frame

DIGEST = "sha256:" + "ab" * 32
MAX_ID = (1 << 32) - 2


@dataclass(frozen=True)
class Seed:
    name: str
    entries: list[dict[str, Any]]
    error: type[Exception] = TOCError
    #: a regular expression the message must match
    match: str = ""
    #: builder limits (``max_depth``, ``max_name_bytes``) to open it with
    limits: dict[str, int] = field(default_factory=dict)


def toc_json(entries: list[dict[str, Any]]) -> bytes:
    return json.dumps({"version": 1, "entries": entries}, indent="\t").encode()


def _deep(depth: int, leaf: str = "f") -> str:
    return "/".join(["a"] * depth) + "/" + leaf


def _wide_deep(tops: int, depth: int, width: int) -> list[dict[str, Any]]:
    """``tops`` files, each under ``depth`` implied directories named with ``width``
    characters: little JSON, but the implied directories' paths add up to ~tops *
    depth^2 * width / 2 characters."""
    part = "d" * width
    return [
        {"name": f"t{k}/" + "/".join([part] * depth) + "/f", "type": "reg"} for k in range(tops)
    ]


SEEDS: list[Seed] = [
    # --- names that would cost memory by the square of their depth -------------------------
    Seed(
        "deep implied directories",
        [{"name": _deep(8000), "type": "reg"}],
        match=r"TOC entry 0 \('a/a/.*\(16001 characters\).*'\): 8001 path components, "
        r"more than the limit of 256",
    ),
    Seed(
        "deep explicit directory",
        [{"name": "/".join(["a"] * 300), "type": "dir"}],
        match=r"300 path components, more than the limit of 256",
    ),
    Seed(
        "deep hardlink",
        [{"name": "f", "type": "reg"}, {"name": _deep(300), "type": "hardlink", "linkName": "f"}],
        match=r"TOC entry 1 .* 301 path components",
    ),
    Seed(
        "depth limit lowered",
        [{"name": "a/b/c/d", "type": "reg"}],
        match=r"4 path components, more than the limit of 3",
        limits={"max_depth": 3},
    ),
    Seed(
        "implied directories exceed the name budget",
        _wide_deep(12, 250, 250),
        match=r"TOC entry \d+ .*: the layer's paths \(names and the directories they imply\) "
        r"exceed the limit of \d+ characters",
    ),
    Seed(
        "names exceed a lowered budget",
        [{"name": f"file-{k:03d}", "type": "reg"} for k in range(20)],
        match=r"TOC entry 12 \('file-012'\): the layer's paths .* limit of 100 characters",
        limits={"max_name_bytes": 100},
    ),
    # --- a name component Linux could never look up ------------------------------------------
    Seed(
        "component of 256 bytes",
        [{"name": "x" * 256, "type": "reg"}],
        match=r"name component 'x+\.\.\.\(256 characters\)\.\.\.x+' is 256 bytes, "
        r"longer than NAME_MAX \(255 bytes\)",
    ),
    Seed(
        "component of 256 UTF-8 bytes",
        [{"name": "d/" + "\u00e9" * 128, "type": "reg"}],
        match=r"is 256 bytes, longer than NAME_MAX",
    ),
    Seed(
        "implied directory component too long",
        [{"name": "y" * 300 + "/f", "type": "reg"}],
        match=r"name component 'y+\.\.\.\(300 characters\)\.\.\.y+' is 300 bytes",
    ),
    Seed(
        "hardlink name too long",
        [{"name": "f", "type": "reg"}, {"name": "z" * 256, "type": "hardlink", "linkName": "f"}],
        match=r"TOC entry 1 .* is 256 bytes",
    ),
]

SEEDS += [
    # --- values the kernel's FUSE structs cannot carry ----------------------------------------
    Seed(
        "uid -1",
        [{"name": "f", "type": "reg", "uid": -1}],
        match=r"TOC entry 0 \('f'\): uid -1 is not a valid owner \(0 to 4294967294\)",
    ),
    Seed(
        "gid 2^32-1",
        [{"name": "d", "type": "dir", "gid": (1 << 32) - 1}],
        match=r"gid 4294967295 is not a valid owner",
    ),
    Seed(
        "uid 2^63-1 on the layer root",
        [{"name": "./", "type": "dir", "uid": (1 << 63) - 1}],
        match=r"TOC entry 0 \(''\): uid 9223372036854775807 is not a valid owner",
    ),
    Seed(
        "device major 2^40",
        [{"name": "dev/x", "type": "char", "devMajor": 1 << 40, "devMinor": 1}],
        match=r"TOC entry 0 \('dev/x'\): devMajor 1099511627776 does not fit the 32-bit device "
        r"number FUSE sends \(major below 4096, minor below 1048576\)",
    ),
    Seed(
        "device minor 2^20",
        [{"name": "dev/y", "type": "block", "devMajor": 8, "devMinor": 1 << 20}],
        match=r"devMinor 1048576 does not fit",
    ),
    Seed(
        "negative device major",
        [{"name": "dev/z", "type": "char", "devMajor": -1}],
        match=r"devMajor -1 does not fit",
    ),
    Seed(
        "negative mode",
        [{"name": "f", "type": "reg", "mode": -1}],
        match=r"mode -0o1 is not a file mode \(0 to 0o177777\)",
    ),
    Seed(
        "mode above 16 bits",
        [{"name": "f", "type": "reg", "mode": 1 << 31 | 0o755}],
        match=r"mode 0o20000000755 is not a file mode",
    ),
    Seed(
        "negative directory size",
        [{"name": "d", "type": "dir", "size": -1}],
        match=r"TOC entry 0 \('d'\): negative size -1",
    ),
    Seed(
        "symlink offset past the blob",
        [{"name": "l", "type": "symlink", "linkName": "x", "offset": 1 << 41}],
        match=r"offset 2199023255552 is outside the blob payload \[0, \d+\]",
    ),
    Seed(
        "empty landmark pointing past the blob",
        [{"name": ".prefetch.landmark", "type": "reg", "offset": 1 << 41}],
        match=r"offset 2199023255552 is outside the blob payload",
    ),
    Seed(
        "negative directory offset",
        [{"name": "d", "type": "dir", "offset": -1}],
        match=r"offset -1 is outside the blob payload",
    ),
]

#: Inputs just inside the limits: they must open (the same in both builders).
ACCEPTED: list[Seed] = [
    Seed("depth 256", [{"name": _deep(255), "type": "reg"}]),
    Seed("component of 255 bytes", [{"name": "x" * 255, "type": "reg"}]),
    Seed("component of 255 UTF-8 bytes", [{"name": "\u00e9" * 127 + "a", "type": "reg"}]),
    Seed("uid and gid 2^32-2", [{"name": "f", "type": "reg", "uid": MAX_ID, "gid": MAX_ID}]),
    Seed(
        "largest device numbers",
        [{"name": "c", "type": "char", "devMajor": 4095, "devMinor": (1 << 20) - 1}],
    ),
    Seed("mode with type bits", [{"name": "d", "type": "dir", "mode": 0o40755}]),
    Seed("mode 0o177777", [{"name": "f", "type": "reg", "mode": 0o177777}]),
    Seed(
        "offset of an empty file at the payload's end",
        [{"name": "e", "type": "reg", "offset": 1 << 40}],
    ),
    Seed(
        "names fill a lowered budget",
        [{"name": "ab/cd", "type": "reg"}],
        limits={"max_name_bytes": 7},
    ),
]


# --- the TOC's framing: nothing may sit between the TOC and the footer -----------------------


def toc_tar(toc: bytes, extra: bytes = b"") -> bytes:
    """The TOC's tar: one entry, ``extra`` (junk), then the end-of-archive blocks."""
    info = tarfile.TarInfo("stargz.index.json")
    info.size = len(toc)
    return info.tobuf(tarfile.USTAR_FORMAT) + toc + bytes(-len(toc) % 512) + extra + bytes(1024)


def gzip_blob(payload: bytes, toc: bytes, *, member_extra: bytes = b"", tar_extra: bytes = b""):
    return (
        payload + gzip.compress(toc_tar(toc, tar_extra)) + member_extra + gzip_footer(len(payload))
    )


def zstd_blob(payload: bytes, toc: bytes, *, in_frame: bytes = b"", after: bytes = b""):
    ctoc = zstandard.ZstdCompressor().compress(toc) + in_frame
    frame = skippable_frame(ctoc)
    return payload + frame + after + zstd_footer_frame(len(payload) + 8, len(ctoc), len(toc))


@dataclass(frozen=True)
class BlobSeed:
    name: str
    compression: str
    #: (payload, TOC JSON) -> the blob: payload, the TOC framed with junk, the footer
    make: Callable[[bytes, bytes], bytes]
    match: str
    error: type[Exception] = TOCError


_EMPTY_TAR_MEMBER = tarfile.TarInfo("x").tobuf(tarfile.USTAR_FORMAT)

BLOB_SEEDS: list[BlobSeed] = [
    BlobSeed(
        "bytes after the gzip TOC member",
        "gzip",
        lambda p, t: gzip_blob(p, t, member_extra=b"JUNKJUNK" * 3),
        r"24 bytes between the TOC gzip member and the footer \(starting b'JUNKJUNK'\): "
        r"junk after the TOC",
    ),
    BlobSeed(
        "a second gzip member after the TOC",
        "gzip",
        lambda p, t: gzip_blob(p, t, member_extra=gzip.compress(b"more")),
        r"bytes between the TOC gzip member and the footer .*junk after the TOC",
    ),
    BlobSeed(
        "a second tar entry after the TOC entry",
        "gzip",
        lambda p, t: gzip_blob(p, t, tar_extra=_EMPTY_TAR_MEMBER),
        r"TOC tar stream holds \d+ bytes after the stargz.index.json entry: junk after the TOC",
    ),
    BlobSeed(
        "bytes between the zstd TOC and the footer",
        "zstd",
        lambda p, t: zstd_blob(p, t, after=b"JUNK"),
        r"4 bytes between the zstd TOC \(which ends at \d+\) and the footer \(at \d+\): "
        r"junk after the TOC",
    ),
    BlobSeed(
        "bytes after the zstd TOC frame, inside its length",
        "zstd",
        lambda p, t: zstd_blob(p, t, in_frame=b"JUNKJUNK"),
        r"the zstd TOC frame is \d+ bytes, followed by 8 more bytes up to the footer: "
        r"junk after the TOC",
    ),
    BlobSeed(
        "a second zstd frame after the TOC frame",
        "zstd",
        lambda p, t: zstd_blob(p, t, in_frame=zstandard.ZstdCompressor().compress(b"{}")),
        r"the zstd TOC frame is \d+ bytes, followed by \d+ more bytes",
    ),
]
