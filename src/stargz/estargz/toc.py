"""The eStargz table of contents (TOC): one JSON document describing every tar entry.

Wire facts (SPEC §1, Go `estargz/types.go`): the document is
``{"version": 1, "entries": [...]}``, written by Go's ``json.MarshalIndent(toc, "", "\\t")``.
Keys are spelled exactly as Go's ``json:`` tags (``userName``/``groupName``, ``linkName``,
``devMajor``...), every field is ``omitempty`` (zero values are left out), ``xattrs`` values
are base64 (Go ``[]byte``), and readers ignore keys they do not know (``NumLink`` in old
files). ``chunkSize`` 0 means "to the end of the file"; the reader fills it in.

The TOC digest that the layer annotation vouches for is the sha256 of the *uncompressed*
JSON bytes, so `dump_toc` reproduces Go's encoder byte for byte (field order, tab indent,
HTML escaping of ``<>&``).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from stargz.errors import TOCError, UnsafePathError

TOC_TAR_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_CONTENTS = b"\x0f"

ENTRY_TYPES = frozenset({"dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"})
DATA_TYPES = frozenset({"reg", "chunk"})

# Go's TOCEntry field order with the JSON key and the Python attribute it maps to.
_FIELDS: tuple[tuple[str, str], ...] = (
    ("name", "name"),
    ("type", "type"),
    ("size", "size"),
    ("modtime", "modtime"),
    ("linkName", "link_name"),
    ("mode", "mode"),
    ("uid", "uid"),
    ("gid", "gid"),
    ("userName", "user_name"),
    ("groupName", "group_name"),
    ("offset", "offset"),
    ("devMajor", "dev_major"),
    ("devMinor", "dev_minor"),
    ("xattrs", "xattrs"),
    ("digest", "digest"),
    ("chunkOffset", "chunk_offset"),
    ("chunkSize", "chunk_size"),
    ("chunkDigest", "chunk_digest"),
    ("innerOffset", "inner_offset"),
)
_INT_KEYS = frozenset(
    {
        "size",
        "mode",
        "uid",
        "gid",
        "offset",
        "devMajor",
        "devMinor",
        "chunkOffset",
        "chunkSize",
        "innerOffset",
    }
)
_STR_KEYS = frozenset(
    {"name", "type", "modtime", "linkName", "userName", "groupName", "digest", "chunkDigest"}
)
_KEY_TO_ATTR = dict(_FIELDS)
_KEY_TYPES: dict[str, type] = {
    **dict.fromkeys(_INT_KEYS, int),
    **dict.fromkeys(_STR_KEYS, str),
    "xattrs": dict,
}
_TYPE_NAMES = {int: "a 64-bit integer", str: "a string", dict: "an object"}
_INT64_MAX = (1 << 63) - 1
_INT64_MIN = -(1 << 63)


@dataclass(slots=True)
class TOCEntry:
    """One TOC entry, as stored (names are cleaned by the reader, not here)."""

    name: str
    type: str
    size: int = 0
    modtime: str = ""
    link_name: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    user_name: str = ""
    group_name: str = ""
    offset: int = 0
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    digest: str = ""
    chunk_offset: int = 0
    chunk_size: int = 0
    chunk_digest: str = ""
    inner_offset: int = 0

    def to_json_obj(self) -> dict[str, Any]:
        """The entry as Go would marshal it: Go's key order, zero values left out."""
        out: dict[str, Any] = {}
        for key, attr in _FIELDS:
            value = getattr(self, attr)
            if not value:
                continue
            if key == "xattrs":
                value = {k: base64.b64encode(v).decode("ascii") for k, v in value.items()}
            out[key] = value
        return out


@dataclass(slots=True)
class TOC:
    version: int = 1
    entries: list[TOCEntry] = field(default_factory=list)


def entry_from_obj(i: int, obj: Any) -> TOCEntry:
    """Entry ``i`` from its JSON object, type-checked key by key (TOCError names the key)."""
    if type(obj) is not dict:
        raise TOCError(f"TOC entry {i} is not a JSON object")
    kwargs: dict[str, Any] = {}
    for key, value in obj.items():
        attr = _KEY_TO_ATTR.get(key)
        if attr is None or value is None:
            continue  # unknown keys (e.g. NumLink) are ignored, as Go does
        want = _KEY_TYPES[key]
        if type(value) is not want:
            raise TOCError(f"TOC entry {i}: {key!r} must be {_TYPE_NAMES[want]}, got {value!r}")
        if want is int and not (_INT64_MIN <= value <= _INT64_MAX):
            raise TOCError(f"TOC entry {i}: {key!r} must be a 64-bit integer, got {value!r}")
        kwargs[attr] = value
    if "xattrs" in kwargs:
        kwargs["xattrs"] = decode_xattrs(i, kwargs["xattrs"])
    if "name" not in kwargs:
        raise TOCError(f"TOC entry {i} has no name")
    etype = kwargs.get("type")
    if etype not in ENTRY_TYPES:
        raise TOCError(f"TOC entry {i} ({kwargs['name']!r}) has unknown type {etype!r}")
    return TOCEntry(**kwargs)


def decode_xattrs(i: int, value: Any) -> dict[str, bytes]:
    """Entry ``i``'s ``xattrs`` object: name -> value bytes (base64 in the JSON)."""
    if not isinstance(value, dict):
        raise TOCError(f"TOC entry {i}: 'xattrs' must be an object")
    out = {}
    for k, v in value.items():
        if not isinstance(v, str):
            raise TOCError(f"TOC entry {i}: xattr {k!r} must be a base64 string")
        try:
            out[k] = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError) as e:
            raise TOCError(f"TOC entry {i}: xattr {k!r} is not valid base64") from e
    return out


def parse_toc(data: bytes) -> TOC:
    """Parse TOC JSON bytes. Raises TOCError naming what is wrong."""
    version, entries = load_toc_doc(data)
    return TOC(version=version, entries=[entry_from_obj(i, e) for i, e in enumerate(entries)])


def load_toc_doc(data: bytes) -> tuple[int, list[Any]]:
    """``(version, entries)`` of TOC JSON bytes; the entries are still JSON objects."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise TOCError(f"TOC is not valid JSON: {e}") from e
    except RecursionError as e:
        raise TOCError("TOC JSON is nested too deeply") from e
    if not isinstance(doc, dict):
        raise TOCError("TOC JSON must be an object")
    version = doc.get("version", 0)
    if type(version) is not int:
        raise TOCError(f"TOC version must be an integer, got {version!r}")
    if version != 1:
        raise TOCError(f"unsupported TOC version {version}")
    entries = doc.get("entries")
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise TOCError("TOC 'entries' must be an array")
    return version, entries


def dump_toc(toc: TOC) -> bytes:
    """Encode as Go's json.MarshalIndent(toc, "", "\\t") does (so digests can match Go's)."""
    doc = {"version": toc.version, "entries": [e.to_json_obj() for e in toc.entries]}
    if not toc.entries:
        doc["entries"] = None  # a nil slice marshals to null in Go
    text = json.dumps(doc, indent="\t", ensure_ascii=False, separators=(",", ": "))
    # Go escapes these for safe embedding in HTML; do the same to match its bytes.
    text = (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )
    return text.encode("utf-8")


def clean_name(name: str) -> str:
    """Normalize a tar/TOC path to a relative path inside the layer ('' is the root).

    A leading ``./`` and repeated or trailing slashes are harmless and removed. Absolute
    names, ``..`` components and NUL bytes could name something outside the layer, so
    they raise UnsafePathError instead of being "fixed".
    """
    if "\x00" in name:
        raise UnsafePathError(f"entry name {name!r} contains a NUL byte")
    if name.startswith("/"):
        raise UnsafePathError(f"entry name {name!r} is absolute and would escape the layer")
    if "//" not in name and "/." not in name and not name.startswith("."):
        return name.rstrip("/")  # no empty, "." or ".." component: already clean
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafePathError(
            f"entry name {name!r} has a '..' component and could escape the layer"
        )
    return "/".join(parts)
