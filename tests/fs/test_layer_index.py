"""The per-layer chunk index's cache keys: made on use, the same strings as ever (the
disk cache is keyed by them, so a restart must find its chunks under the same names)."""

from __future__ import annotations

import pytest

from stargz.fs.chunks import ChunkKeys

LAYER = "sha256:" + "c" * 64


def old_keys(digests: bytes, verify: bool) -> list[str]:
    # the list ChunkIndex used to build
    hexes, zero, n = digests.hex(), "0" * 64, len(digests) // 32
    keys = []
    for r in range(n):
        d = hexes[64 * r : 64 * r + 64]
        keys.append(d if verify and d != zero else f"u-{LAYER[7:]}-{r}")
    return keys


@pytest.mark.parametrize("verify", [True, False])
def test_chunk_keys_are_the_old_strings(verify) -> None:
    digests = bytes(range(32)) + bytes(32) + b"\xff" * 32
    keys = ChunkKeys(digests, 3, verify, LAYER)
    want = old_keys(digests, verify)
    assert len(keys) == 3 and list(keys) == want
    assert keys[-1] == want[-1]
    with pytest.raises(IndexError):
        keys[3]
