"""What a hostile or broken blob can make the daemon hold: bounded by the read, not by the
registry's numbers. Blobs are sparse files (gigabytes on paper, almost nothing on disk),
served by the real `LocalLayerSource`."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from stargz.errors import TOCError
from stargz.estargz.footer import gzip_footer
from stargz.fs import LocalLayerSource
from stargz.fs.layer_open import TAIL_FETCH_SIZE, fetch_tail

GiB = 1 << 30


def test_a_toc_region_over_the_cap_is_refused_before_it_is_fetched(tmp_path):
    """A footer that puts the TOC 2 GiB before the end of the blob: TOCError naming both
    numbers, after fetching only the first tail read."""
    size = 2 * GiB + 4096
    path = tmp_path / "blob"
    with open(path, "wb") as f:
        f.truncate(size - 51)
        f.seek(size - 51)
        f.write(gzip_footer(4096))
    digest = "sha256:" + "ab" * 32
    source = LocalLayerSource(blobs={digest: path})

    async def run():
        blob = await source.resolve("x", digest, {})
        with ThreadPoolExecutor(1) as ex:
            return await fetch_tail(blob, digest, None, ex, 64 << 20)

    with pytest.raises(TOCError) as e:
        asyncio.run(run())
    msg = str(e.value)
    assert str(size - 4096) in msg and str(64 << 20) in msg
    assert source.bytes_read <= TAIL_FETCH_SIZE
