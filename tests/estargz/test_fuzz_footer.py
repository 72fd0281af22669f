"""Fuzz: the footer parser on mutated footers of the reference layers and on made ones.

Seeds are the last 64 bytes of every converted fixture layer (51-byte gzip footers from
the Go tools, 48-byte zstd:chunked footer frames) and footers made here in all three
variants (also the 47-byte legacy one no fixture has), with offsets at the edges. They
are damaged (byte flips, truncation, splices of two footers, random junk). Whatever the
input, `parse_footer` returns a `Footer` or raises `FooterError`, and a footer it returns
is sound: the bytes are what the encoder of that variant writes (up to the fields the
format leaves free: gzip MTIME/XFL/OS and the member's body, hex case), and the TOC lies inside
the payload before the footer. Footers made by the encoders always parse back.
"""

from __future__ import annotations

import pytest
from fuzzing import fuzz_settings, fuzz_timeout
from hypothesis import example, given
from hypothesis import strategies as st

from stargz.errors import FooterError
from stargz.estargz.footer import (
    GZIP_FOOTER_SIZE,
    LEGACY_FOOTER_SIZE,
    ZSTD_FOOTER_FRAME_SIZE,
    Footer,
    gzip_footer,
    legacy_footer,
    parse_footer,
    zstd_footer_frame,
)

pytestmark = [pytest.mark.fuzz, fuzz_timeout(60)]

U64 = (1 << 64) - 1
SIZES = {"gzip": GZIP_FOOTER_SIZE, "legacy": LEGACY_FOOTER_SIZE, "zstd": ZSTD_FOOTER_FRAME_SIZE}


def _fixture_tails() -> list[bytes]:
    from conftest import OCILayout, find_shared

    tails = []
    for name in ("oci-corners", "oci-busybox"):
        layout = OCILayout(find_shared() / "fixtures" / name)
        for tag in layout.tags:
            for layer in layout.layers(tag):
                if layer.toc_digest:
                    with open(layer.path, "rb") as f:
                        f.seek(max(layer.size - 64, 0))
                        tails.append(f.read())
    assert len(tails) >= 8
    return tails


TAILS = _fixture_tails()
MADE = [
    gzip_footer(0),
    gzip_footer(12345),
    legacy_footer(0),
    legacy_footer(0xABCDEF),
    zstd_footer_frame(8, 1, 1),
    zstd_footer_frame(100, 20, 50),
]


def normalized(kind: str, footer: bytes) -> bytes:
    """The bytes the encoder's output must equal: free fields zeroed, hex lowercased."""
    b = bytearray(footer)
    if kind in ("gzip", "legacy"):
        b[4:10] = bytes(6)  # MTIME, XFL, OS
        hex_at = 16 if kind == "gzip" else 12
        # the empty member's body (stored block, CRC32, ISIZE): like Go's gzip.NewReader,
        # the parser reads the header only
        b[hex_at + 22 :] = bytes(len(b) - hex_at - 22)
        b[hex_at : hex_at + 16] = bytes(b[hex_at : hex_at + 16]).lower()
    return bytes(b)


def check_sound(tail: bytes, blob_size: int, f: Footer) -> None:
    """A footer that parsed is one the encoder could have written, inside the blob."""
    assert f.kind in SIZES and f.footer_size == SIZES[f.kind], f
    assert len(tail) >= f.footer_size
    limit = blob_size - f.footer_size
    assert 0 <= f.toc_offset < limit, f
    raw = tail[-f.footer_size :]
    if f.kind == "zstd":
        assert 0 < f.toc_size and f.toc_offset + f.toc_size <= limit, f
        assert raw == zstd_footer_frame(f.toc_offset, f.toc_size, f.toc_uncompressed_size)
    else:
        assert f.toc_size == 0 and f.toc_uncompressed_size == 0, f
        made = gzip_footer if f.kind == "gzip" else legacy_footer
        assert normalized(f.kind, raw) == normalized(f.kind, made(f.toc_offset)), raw


def parse(tail: bytes, blob_size: int) -> Footer | None:
    try:
        f = parse_footer(tail, blob_size)
    except FooterError as e:
        assert str(e).startswith("no eStargz footer found: ")
        return None
    check_sound(tail, blob_size, f)
    return f


@st.composite
def damaged(draw):
    """(tail, blob size): a seed footer, damaged."""
    tail = bytearray(draw(st.sampled_from(TAILS + MADE)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "flip", "set", "cut", "splice", "prefix"]))
        if op == "flip" and tail:
            tail[draw(st.integers(0, len(tail) - 1))] ^= draw(st.integers(1, 255))
        elif op == "set" and tail:
            # a byte of the footer's own fields, set to a value the checks look for
            pos = draw(st.integers(max(len(tail) - 51, 0), len(tail) - 1))
            tail[pos] = draw(st.sampled_from(b"0fF9aAgG\x00\xff\x1f\x8b\x16\x1a\x28P"))
        elif op == "cut":
            del tail[: draw(st.integers(0, len(tail)))]
        elif op == "splice":
            other = draw(st.sampled_from(TAILS + MADE))
            k = draw(st.integers(0, min(len(other), 64)))
            tail[len(tail) - k :] = other[len(other) - k :]
        elif op == "prefix":
            tail[:0] = draw(st.binary(max_size=16))
    tail = bytes(tail[-64:])
    extra = draw(st.one_of(st.integers(0, 64), st.integers(0, U64), st.just(1 << 40)))
    return tail, len(tail) + extra


@fuzz_settings(1500)
@given(case=damaged())
@example(case=(gzip_footer(0), GZIP_FOOTER_SIZE))  # TOC offset at the footer: refused
@example(case=(zstd_footer_frame(8, 0, 0), 100))  # empty TOC
@example(case=(zstd_footer_frame(U64, U64, U64), U64))  # offsets that overflow 64 bits
def test_damaged_footers_parse_soundly_or_raise_footer_error(case) -> None:
    parse(*case)


@fuzz_settings(800)
@given(
    kind=st.sampled_from(["gzip", "legacy", "zstd"]),
    off=st.one_of(st.integers(0, 1 << 20), st.integers(0, U64)),
    clen=st.integers(1, U64),
    ulen=st.integers(0, U64),
    junk=st.binary(max_size=20),
    slack=st.integers(0, 1 << 20),
)
def test_made_footers_parse_back(kind, off, clen, ulen, junk, slack) -> None:
    if kind == "zstd":
        raw = zstd_footer_frame(off, clen, ulen)
        need = off + clen
    else:
        raw = (gzip_footer if kind == "gzip" else legacy_footer)(off % (1 << 64))
        need = off + 1
    tail = (junk + raw)[-64:]
    size = need + len(raw) + slack
    f = parse(tail, size)
    # a gzip footer's 16 hex digits are also not a zstd one: nothing else matches first
    assert f == Footer(
        kind, off, clen if kind == "zstd" else 0, ulen if kind == "zstd" else 0, len(raw)
    )
    # one byte less of blob and the TOC would overlap the footer: refused
    if slack == 0:
        assert parse(tail, size - 1) is None


def test_fixture_footers_parse() -> None:
    """Control: the seeds themselves are footers (so mutations start from real ones)."""
    kinds = set()
    for tail in TAILS:
        f = parse(tail, 1 << 30)
        assert f is not None
        kinds.add(f.kind)
    assert kinds == {"gzip", "zstd"}
