"""The snapshotter's record of layers it did not mount lazily: reason codes by error kind,
one entry per target snapshot, bounded."""

from __future__ import annotations

import pytest

from stargz.errors import (
    AuthError,
    BlobNotFound,
    ChunkError,
    DigestMismatch,
    FooterError,
    InvalidArgument,
    NoTOCDigest,
    RegistryError,
    TOCError,
    Unavailable,
)
from stargz.snapshot.refusals import REASONS, Refusals, reason_of


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (NoTOCDigest("no toc"), "no-toc-digest"),
        (FooterError("no footer"), "not-estargz"),
        (TOCError("bad toc"), "invalid-estargz"),
        (ChunkError("bad chunk"), "invalid-estargz"),
        (DigestMismatch("toc digest"), "verification-failed"),
        (AuthError("401"), "registry-auth"),
        (BlobNotFound("404"), "registry-not-found"),
        (RegistryError("503"), "registry-error"),
        (Unavailable("resolve timed out"), "registry-error"),
        (TimeoutError(), "registry-error"),
        (InvalidArgument("no layer source in the labels"), "bad-labels"),
        (RuntimeError("bug"), "internal"),
    ],
)
def test_reason_codes_by_error_kind(error, code):
    assert reason_of(error) == code
    assert code in REASONS


def test_one_entry_per_snapshot_counted_newest_last_and_bounded():
    r = Refusals(limit=3)
    for i in range(5):
        r.record(f"s{i}", f"k{i}", {"l": str(i)}, "no-toc-digest", f"e{i}")
    assert [x.snapshot for x in r] == ["s2", "s3", "s4"]
    again = r.record("s2", "k2b", {}, "registry-error", "x" * 10_000)
    assert again.count == 2 and len(again.error) == 500
    assert [x.snapshot for x in r] == ["s3", "s4", "s2"]
    assert again.reason_text == REASONS["registry-error"]
    r.forget("s3")
    r.forget("never")
    assert [x.snapshot for x in r] == ["s4", "s2"] and len(r) == 2
