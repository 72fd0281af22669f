"""Footers: the last bytes of a blob, which say where the TOC starts.

Three variants are read (SPEC §1), tried in this order, as Go's ``estargz.Open`` does:

* eStargz gzip, 51 bytes: an empty gzip member whose FEXTRA field holds the subfield
  ``SG``, LEN=22, payload ``"%016x" % toc_offset + "STARGZ"``. 51 = 10 (header) + 2 (XLEN)
  + 26 (extra) + 5 (empty stored block) + 8 (CRC32 + ISIZE).
* legacy stargz (CRFS), 47 bytes: the same without SI1/SI2/LEN, so the 22-byte payload is
  the whole extra field.
* zstd:chunked, 40 bytes inside a zstd skippable frame (magic ``50 2a 4d 18``, LE32 size):
  LE u64 TOC offset, compressed length, uncompressed length, manifest type (1), then the
  magic ``GnUlInUx``. The offset points 8 bytes past the skippable frame's start.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from stargz.errors import FooterError

GZIP_FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
ZSTD_FOOTER_SIZE = 40
ZSTD_FOOTER_FRAME_SIZE = ZSTD_FOOTER_SIZE + 8
MAX_FOOTER_SIZE = ZSTD_FOOTER_FRAME_SIZE

SKIPPABLE_FRAME_MAGIC = b"\x50\x2a\x4d\x18"
ZSTD_FRAME_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_CHUNKED_MAGIC = b"GnUlInUx"
ZSTD_MANIFEST_TYPE_CRFS = 1

# Everything but the 16 hex digits of the offset is constant.
_GZIP_HEAD = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff\x1a\x00SG\x16\x00"
_LEGACY_HEAD = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff\x16\x00"
_GZIP_TAIL = b"STARGZ\x01\x00\x00\xff\xff" + b"\x00" * 8


@dataclass(frozen=True, slots=True)
class Footer:
    """Where the TOC is. ``toc_size`` is the compressed size (0 = up to the footer)."""

    kind: str  # "gzip", "legacy" or "zstd"
    toc_offset: int
    toc_size: int
    toc_uncompressed_size: int
    footer_size: int  # bytes at the end of the blob that belong to the footer

    @property
    def compression(self) -> str:
        return "zstd" if self.kind == "zstd" else "gzip"


def gzip_footer(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer, identical to Go's ``gzipFooterBytes``."""
    return _GZIP_HEAD + b"%016x" % toc_offset + _GZIP_TAIL


def legacy_footer(toc_offset: int) -> bytes:
    return _LEGACY_HEAD + b"%016x" % toc_offset + _GZIP_TAIL


def zstd_footer_frame(toc_offset: int, toc_compressed: int, toc_uncompressed: int) -> bytes:
    """The skippable frame holding the 40-byte zstd:chunked footer (48 bytes in all)."""
    payload = struct.pack(
        "<QQQQ", toc_offset, toc_compressed, toc_uncompressed, ZSTD_MANIFEST_TYPE_CRFS
    )
    return skippable_frame(payload + ZSTD_CHUNKED_MAGIC)


def skippable_frame(payload: bytes) -> bytes:
    return SKIPPABLE_FRAME_MAGIC + struct.pack("<I", len(payload)) + payload


def _parse_hex_offset(field: bytes, what: str) -> int:
    try:
        text = field.decode("ascii")
        if len(text) != 16 or not all(c in "0123456789abcdefABCDEF" for c in text):
            raise ValueError
        return int(text, 16)
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{what}: TOC offset {field!r} is not 16 hex digits") from None


def _parse_gzip(tail: bytes) -> Footer:
    if len(tail) < GZIP_FOOTER_SIZE:
        raise ValueError(f"gzip: blob shorter than the {GZIP_FOOTER_SIZE}-byte footer")
    p = tail[-GZIP_FOOTER_SIZE:]
    if p[:4] != b"\x1f\x8b\x08\x04":
        raise ValueError("gzip: invalid header")
    if p[10:16] != b"\x1a\x00SG\x16\x00":
        raise ValueError("gzip: extra field is not the eStargz 'SG' subfield of 22 bytes")
    if p[32:38] != b"STARGZ":
        raise ValueError("gzip: STARGZ magic string must be included in the footer subfield")
    off = _parse_hex_offset(p[16:32], "gzip")
    return Footer("gzip", off, 0, 0, GZIP_FOOTER_SIZE)


def _parse_legacy(tail: bytes) -> Footer:
    if len(tail) < LEGACY_FOOTER_SIZE:
        raise ValueError(f"legacy: blob shorter than the {LEGACY_FOOTER_SIZE}-byte footer")
    p = tail[-LEGACY_FOOTER_SIZE:]
    if p[:4] != b"\x1f\x8b\x08\x04" or p[10:12] != b"\x16\x00":
        raise ValueError("legacy: invalid header or extra field size")
    if p[28:34] != b"STARGZ":
        raise ValueError("legacy: magic string STARGZ not found")
    off = _parse_hex_offset(p[12:28], "legacy")
    return Footer("legacy", off, 0, 0, LEGACY_FOOTER_SIZE)


def _parse_zstd(tail: bytes) -> Footer:
    if len(tail) < ZSTD_FOOTER_FRAME_SIZE:
        raise ValueError(
            f"zstd:chunked: blob shorter than the {ZSTD_FOOTER_FRAME_SIZE}-byte footer"
        )
    p = tail[-ZSTD_FOOTER_FRAME_SIZE:]
    if p[-8:] != ZSTD_CHUNKED_MAGIC:
        raise ValueError("zstd:chunked: invalid magic number")
    if p[:4] != SKIPPABLE_FRAME_MAGIC or p[4:8] != struct.pack("<I", ZSTD_FOOTER_SIZE):
        raise ValueError("zstd:chunked: footer is not in a 40-byte skippable frame")
    off, clen, ulen, mtype = struct.unpack("<QQQQ", p[8:40])
    if mtype != ZSTD_MANIFEST_TYPE_CRFS:
        raise ValueError(f"zstd:chunked: unsupported manifest type {mtype}")
    if clen == 0:
        raise ValueError("zstd:chunked: TOC compressed length is 0")
    return Footer("zstd", off, clen, ulen, ZSTD_FOOTER_FRAME_SIZE)


_PARSERS = (_parse_gzip, _parse_legacy, _parse_zstd)


def parse_footer(tail: bytes, blob_size: int) -> Footer:
    """Find the footer in the last bytes of a blob of ``blob_size`` bytes.

    Tries every variant; when none matches, the FooterError lists each attempt.
    Also checks that the TOC lies inside the blob, before the footer.
    """
    errors = []
    for parse in _PARSERS:
        try:
            footer = parse(tail)
        except ValueError as e:
            errors.append(str(e))
            continue
        limit = blob_size - footer.footer_size
        if footer.toc_offset >= limit:
            errors.append(
                f"{footer.kind}: TOC offset {footer.toc_offset} is past the end of the "
                f"payload ({limit} bytes)"
            )
            continue
        if footer.toc_size and footer.toc_offset + footer.toc_size > limit:
            errors.append(
                f"{footer.kind}: TOC [{footer.toc_offset}, +{footer.toc_size}) runs past "
                f"the footer at {limit}"
            )
            continue
        return footer
    raise FooterError("no eStargz footer found: " + " / ".join(errors))
