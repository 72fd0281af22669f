"""Range requests: Content-Range, multipart/byteranges, coalescing."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stargz.errors import RegistryProtocolError
from stargz.remote.multipart import (
    Part,
    coalesce,
    extract,
    multipart_boundary,
    parse_byteranges,
    parse_content_range,
    range_header,
)


def test_content_range():
    assert parse_content_range("bytes 0-9/100") == (0, 10, 100)
    assert parse_content_range(b"bytes 5-5/*") == (5, 6, None)
    for bad in ("bytes 9-0/100", "bytes 0-100/100", "bits 0-1/2", "", None, "bytes */100"):
        with pytest.raises(RegistryProtocolError):
            parse_content_range(bad)


def test_boundary():
    assert multipart_boundary("multipart/byteranges; boundary=abc") == "abc"
    assert multipart_boundary('Multipart/ByteRanges;boundary="a \\"b"') == 'a "b'
    assert multipart_boundary("application/octet-stream") is None
    assert multipart_boundary(None) is None
    with pytest.raises(RegistryProtocolError):
        multipart_boundary("multipart/byteranges")


def test_coalesce_and_header():
    assert coalesce([(10, 20), (0, 5), (5, 7), (15, 30), (40, 40)]) == [(0, 7), (10, 30)]
    assert coalesce([(0, 5), (8, 10), (30, 31)], gap=3) == [(0, 10), (30, 31)]
    assert range_header([(0, 7), (10, 30)]) == "bytes=0-6,10-29"


def _multipart(blob: bytes, spans, boundary: str, nl: bytes, rnd: random.Random) -> bytes:
    out = []
    if rnd.random() < 0.5:
        out.append(b"preamble to ignore" + nl)
    for s, e in spans:
        out.append(b"--" + boundary.encode() + nl)
        out.append(b"Content-Type: application/octet-stream" + nl)
        if rnd.random() < 0.3:
            out.append(b"X-Extra: yes" + nl)
        out.append(f"Content-Range: bytes {s}-{e - 1}/{len(blob)}".encode() + nl + nl)
        out.append(blob[s:e] + nl)
    out.append(b"--" + boundary.encode() + b"--" + nl)
    if rnd.random() < 0.5:
        out.append(b"epilogue")
    return b"".join(out)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    n=st.integers(1, 12),
    crlf=st.booleans(),
)
def test_multipart_roundtrip(seed, n, crlf):
    rnd = random.Random(seed)
    boundary = "b" + rnd.randbytes(8).hex()
    # the blob holds the boundary itself: the parser must go by lengths, not by search
    blob = rnd.randbytes(2000) + (b"\r\n--" + boundary.encode()) * 3 + rnd.randbytes(500)
    spans = []
    for _ in range(n):
        s = rnd.randrange(len(blob))
        spans.append((s, rnd.randrange(s + 1, min(len(blob), s + 400) + 1)))
    regions = coalesce(spans)
    order = list(regions)
    rnd.shuffle(order)  # servers may reorder parts
    body = _multipart(blob, order, boundary, b"\r\n" if crlf else b"\n", rnd)
    parts = parse_byteranges(body, boundary)
    assert sorted((p.start, bytes(p.data)) for p in parts) == [(s, blob[s:e]) for s, e in regions]
    found, missing = extract(parts, spans)
    assert not missing
    assert all(found[(s, e)] == blob[s:e] for s, e in spans)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"no boundary at all",
        b"--XYZ\r\nContent-Type: a\r\n\r\nabc\r\n--XYZ--\r\n",  # no Content-Range
        b"--XYZ\r\nContent-Range: bytes 0-9/100\r\n\r\nshort\r\n--XYZ--\r\n",  # truncated
        b"--XYZ\r\nContent-Range: bytes 0-1/100\r\n\r\nlonger than two\r\n--XYZ--\r\n",
        b"--XYZ\r\nContent-Range bytes 0-1/100\r\n\r\nab\r\n--XYZ--\r\n",  # bad header line
        b"--XYZ--\r\n",  # no parts
    ],
)
def test_multipart_rejects(body):
    with pytest.raises(RegistryProtocolError):
        parse_byteranges(body, "XYZ")


def test_extract_reports_missing():
    parts = [Part(0, memoryview(b"abcdef")), Part(10, memoryview(b"klmn"))]
    found, missing = extract(parts, [(1, 3), (4, 8), (11, 14)])
    assert found == {(1, 3): b"bc", (11, 14): b"lmn"}
    assert missing == [(4, 8)]
