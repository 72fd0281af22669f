"""HTTP byte ranges: ``Range`` headers, ``Content-Range``, ``multipart/byteranges`` bodies.

Ranges here are half-open ``(start, end)`` pairs of blob offsets; the wire format is
inclusive (``bytes=0-9`` is 10 bytes). A multi-range request (RFC 9110 §14) may be
answered with:

- ``206`` and ``multipart/byteranges``: one part per range, each with its own
  ``Content-Range`` (the server may merge or reorder ranges);
- ``206`` with one ``Content-Range``: the server merged all ranges into one;
- ``200`` and the whole blob: the server ignores ranges.

The multipart parser does not search for the boundary inside part bodies: it reads each
part's length from its ``Content-Range``, so blob bytes that happen to contain the
boundary cannot confuse it. Anything that does not parse raises
:class:`RegistryProtocolError`, which the fetcher treats as "no multi-range here".
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from stargz.errors import RegistryProtocolError

Region = tuple[int, int]  # half-open [start, end)

_CONTENT_RANGE_RE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*\Z", re.IGNORECASE)
_BOUNDARY_RE = re.compile(r';\s*boundary\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]+))', re.IGNORECASE)


def parse_content_range(value: str | bytes | None) -> tuple[int, int, int | None]:
    """``bytes a-b/total`` -> ``(a, b + 1, total)``; total is None for ``*``."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    m = _CONTENT_RANGE_RE.match(value or "")
    if not m:
        raise RegistryProtocolError(f"malformed Content-Range {value!r}")
    start, last = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if last < start or (total is not None and last >= total):
        raise RegistryProtocolError(f"inconsistent Content-Range {value!r}")
    return start, last + 1, total


def multipart_boundary(content_type: str | None) -> str | None:
    """The boundary of a ``multipart/byteranges`` Content-Type, None if it is not one."""
    if not content_type:
        return None
    mtype = content_type.split(";", 1)[0].strip().lower()
    if mtype != "multipart/byteranges":
        return None
    m = _BOUNDARY_RE.search(content_type)
    if not m:
        raise RegistryProtocolError(f"multipart Content-Type without a boundary: {content_type!r}")
    boundary = m.group(1) if m.group(1) is not None else m.group(2)
    if m.group(1) is not None:
        boundary = re.sub(r"\\(.)", r"\1", boundary)
    if not boundary or len(boundary) > 200:
        raise RegistryProtocolError(f"bad multipart boundary {boundary!r}")
    return boundary


def range_header(regions: Sequence[Region]) -> str:
    """``bytes=a-b,c-d`` for half-open regions."""
    return "bytes=" + ",".join(f"{s}-{e - 1}" for s, e in regions)


def coalesce(ranges: Iterable[Region], gap: int = 0) -> list[Region]:
    """Sort and merge regions that overlap, touch, or are at most ``gap`` bytes apart."""
    out: list[list[int]] = []
    for s, e in sorted(r for r in ranges if r[1] > r[0]):
        if out and s <= out[-1][1] + gap:
            if e > out[-1][1]:
                out[-1][1] = e
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


@dataclass(frozen=True, slots=True)
class Part:
    """Bytes ``[start, start + len(data))`` of the blob."""

    start: int
    data: memoryview

    @property
    def end(self) -> int:
        return self.start + len(self.data)


def parse_byteranges(body: bytes | memoryview, boundary: str) -> list[Part]:
    """Parse a ``multipart/byteranges`` body (RFC 2046 framing, CRLF or bare LF)."""
    raw = body if isinstance(body, bytes) else bytes(body)
    view = memoryview(raw)
    delim = b"--" + boundary.encode("latin-1")
    pos = raw.find(delim)
    if pos < 0 or (pos > 0 and raw[pos - 1 : pos] != b"\n"):
        raise RegistryProtocolError("multipart body: no opening boundary")
    parts: list[Part] = []
    n = len(raw)
    while True:
        pos += len(delim)
        if raw.startswith(b"--", pos):
            break  # close delimiter; the epilogue is ignored
        eol = raw.find(b"\n", pos)
        if eol < 0 or raw[pos:eol].strip(b" \t\r"):
            raise RegistryProtocolError("multipart body: garbage after a boundary")
        pos = eol + 1
        content_range = None
        while True:
            eol = raw.find(b"\n", pos)
            if eol < 0:
                raise RegistryProtocolError("multipart body: truncated part headers")
            line = raw[pos:eol].rstrip(b"\r")
            pos = eol + 1
            if not line:
                break
            name, sep, value = line.partition(b":")
            if not sep:
                raise RegistryProtocolError(f"multipart body: bad header line {line[:80]!r}")
            if name.strip().lower() == b"content-range":
                content_range = value
        if content_range is None:
            raise RegistryProtocolError("multipart body: a part has no Content-Range")
        start, end, _ = parse_content_range(content_range)
        if pos + (end - start) > n:
            raise RegistryProtocolError("multipart body: truncated part")
        parts.append(Part(start, view[pos : pos + end - start]))
        pos += end - start
        if raw.startswith(b"\r\n", pos):
            pos += 2
        elif raw.startswith(b"\n", pos):
            pos += 1
        else:
            raise RegistryProtocolError("multipart body: part longer than its Content-Range")
        if not raw.startswith(delim, pos):
            raise RegistryProtocolError("multipart body: part longer than its Content-Range")
    if not parts:
        raise RegistryProtocolError("multipart body holds no part")
    return parts


def extract(
    parts: Sequence[Part], regions: Sequence[Region]
) -> tuple[dict[Region, bytes], list[Region]]:
    """Bytes of each region from the parts that contain it; plus the regions not covered."""
    ordered = sorted(parts, key=lambda p: p.start)
    starts = [p.start for p in ordered]
    found: dict[Region, bytes] = {}
    missing: list[Region] = []
    for s, e in regions:
        i = bisect.bisect_right(starts, s) - 1
        # a later part may start at the same offset and be longer: scan back over equals
        hit = None
        while i >= 0 and ordered[i].start <= s:
            if ordered[i].end >= e:
                hit = ordered[i]
                break
            i -= 1
        if hit is None:
            missing.append((s, e))
        else:
            found[(s, e)] = bytes(hit.data[s - hit.start : e - hit.start])
    return found, missing
