"""READ answers spliced from verified cache files into /dev/fuse (``[fuse] splice``).

Every test serves reads from the daemon (passthrough off) with no memory LRU, so a read
of a fetched chunk is answered from its disk-cache file: spliced, or copied when splicing
is off or fails. The bytes are checked against the ``orig`` layer's own tar (read with
``tarfile``), whose digests the ground-truth listing confirms.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import mmap
import os
import tarfile
import time

import pytest

from stargz.fs import LocalLayerSource
from stargz.fuse.session import SPLICE_MIN

#: Files of the first corners layer: 5 MiB incompressible (bigger than the splice pipe)
#: and 2 MiB of text.
FILES = ("data/noise.bin", "data/text.txt")
MiB = 1 << 20
#: A read this large is spliced (smaller ones are copied: `SPLICE_MIN`).
SPLICED = SPLICE_MIN


@pytest.fixture(scope="module")
def truth(corners, merged_truth) -> dict[str, bytes]:
    """The files' bytes from the plain tar+gzip layer, checked against the listing."""
    out = {}
    with tarfile.open(corners.layers("orig")[0].path, "r:gz") as tf:
        for name in FILES:
            f = tf.extractfile(name)
            assert f is not None
            out[name] = f.read()
            assert hashlib.sha256(out[name]).hexdigest() == merged_truth["entries"][name]["sha256"]
    return out


def _start(fs_env, source, **options):
    return fs_env.start(source, passthrough=False, memory_cache_bytes=0, **options)


def _drop_page_cache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_all(path, step: int = MiB) -> bytes:
    with open(path, "rb", buffering=0) as f:
        out = []
        while chunk := f.read(step):
            out.append(chunk)
    return b"".join(out)


def _pread_direct(path, off: int, size: int) -> bytes:
    """``size`` bytes at ``off`` with O_DIRECT (one FUSE READ each, never the page cache)."""
    buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT wants
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], off)
        return bytes(buf[:n])
    finally:
        os.close(fd)
        buf.close()


def _fetch(fs_env, fs, mp, digest: str) -> None:
    """Read every file once (fetched, verified, written to the disk cache), wait for the
    cache files to be placed, and drop the FUSE page cache so the next reads reach us."""
    for name in FILES:
        _read_all(mp / name)

    async def settled() -> None:
        # a fetched chunk is in flight until its cache file is written, then placed
        deadline = time.monotonic() + 30
        while fs.layer(digest).fetcher.inflight or fs.disk._placing:
            assert time.monotonic() < deadline, "chunks still in flight"
            await asyncio.sleep(0.01)

    fs_env.run(settled())
    for name in FILES:
        _drop_page_cache(mp / name)


@pytest.mark.parametrize("tag,chunk", [("esgz", 4 * MiB), ("esgz-64k", 64 << 10)])
def test_spliced_reads_return_the_ground_truth(fs_env, corners, corners_source, truth, tag, chunk):
    layer = corners.layers(tag)[0]
    fs = _start(fs_env, corners_source)
    mp = fs_env.mount(layer)
    _fetch(fs_env, fs, mp, layer.digest)
    requests = corners_source.requests
    m = fs.layer(layer.digest).metrics
    before = fs.splice_counts

    def spliced() -> int:
        return fs.splice_counts[1]

    for name in FILES:
        want = truth[name]
        size = len(want)
        # sequential, through the page cache (the kernel's read-ahead asks up to 1 MiB)
        n = spliced()
        assert _read_all(mp / name) == want
        assert spliced() > n
        # whole file in 1 MiB O_DIRECT reads: more than the pipe holds, one READ (or two:
        # see `splice_read_pages`) at a time; the last one may be too small to splice
        n = spliced()
        got = b"".join(_pread_direct(mp / name, off, MiB) for off in range(0, size, MiB))
        assert got == want
        assert spliced() - n >= size // MiB
        # across a chunk boundary (two cache files, or five, in one answer)
        for edge in (chunk, 2 * chunk, 4 * chunk):
            if SPLICED <= edge < size:
                n = spliced()
                got = _pread_direct(mp / name, edge - SPLICED, 2 * SPLICED)
                assert got == want[edge - SPLICED : edge + SPLICED]
                assert spliced() == n + 1
        # at the end of the file: the answer is short, exactly the rest
        last = size // 4096 * 4096
        n = spliced()
        assert _pread_direct(mp / name, last - SPLICED, 2 * SPLICED) == want[last - SPLICED :]
        assert spliced() == n + 1
        assert _pread_direct(mp / name, last + 4096, SPLICED) == b""
        # a small read is copied (cheaper than splicing), and right too
        n = spliced()
        edge = chunk if chunk < size else 4096
        assert _pread_direct(mp / name, edge - 4096, 8192) == want[edge - 4096 : edge + 4096]
        assert spliced() == n

    on, _, fallbacks = fs.splice_counts
    assert on and fallbacks == before[2]
    assert m.disk_hits > 0 and m.disk_cache_rejects == 0
    assert corners_source.requests == requests  # all from the disk cache


def test_a_failing_splice_falls_back_to_copying_once(
    fs_env, corners, corners_source, truth, monkeypatch, caplog
):
    layer = corners.layers("esgz-64k")[0]
    fs = _start(fs_env, corners_source)
    mp = fs_env.mount(layer)
    _fetch(fs_env, fs, mp, layer.digest)
    calls = []

    def refused(*args, **kwargs):
        calls.append(args)
        raise OSError(errno.EINVAL, "splice refused (injected)")

    before = fs.splice_counts
    monkeypatch.setattr(os, "splice", refused)
    with caplog.at_level(logging.WARNING, logger="stargz.fuse"):
        for name in FILES:
            assert _read_all(mp / name) == truth[name]
            n = len(truth[name])
            got = _pread_direct(mp / name, n // 2 // 4096 * 4096, SPLICED)
            assert got == truth[name][n // 2 // 4096 * 4096 :][:SPLICED]
    on, spliced, fallbacks = fs.splice_counts
    assert not on and spliced == before[1] and fallbacks == before[2] + 1
    assert len(calls) == 1  # off for the session after the first refusal
    warned = [r for r in caplog.records if "splicing READ answers" in r.getMessage()]
    assert len(warned) == 1


def test_a_cache_file_found_short_is_fetched_again(fs_env, corners, truth):
    layer = corners.layers("esgz-64k")[0]
    source = LocalLayerSource(layouts=[corners.root])
    fs = _start(fs_env, source)
    mp = fs_env.mount(layer)
    _fetch(fs_env, fs, mp, layer.digest)
    # damage after verification: the second chunk's cache file loses its second half
    lay = fs.layer(layer.digest)
    node = lay.reader.lookup("data/noise.bin").id
    row = lay.chunks.span(node)[0] + 1
    path = fs.disk.path(lay.index.keys[row])
    os.truncate(path, os.path.getsize(path) // 2)
    requests = source.requests
    before = fs.splice_counts

    want = truth["data/noise.bin"]
    assert _pread_direct(mp / "data/noise.bin", 0, MiB) == want[:MiB]
    assert source.requests > requests  # the short chunk was fetched again, not served
    assert lay.metrics.disk_cache_rejects >= 1
    on, _, fallbacks = fs.splice_counts
    assert on and fallbacks == before[2] + 1  # a short file does not turn splicing off
    _drop_page_cache(mp / "data/noise.bin")
    assert _read_all(mp / "data/noise.bin") == want


def test_splice_off_copies_every_answer(fs_env, corners, corners_source, truth):
    layer = corners.layers("esgz")[0]
    fs = _start(fs_env, corners_source, splice=False)
    mp = fs_env.mount(layer)
    _fetch(fs_env, fs, mp, layer.digest)
    for name in FILES:
        assert _read_all(mp / name) == truth[name]
    assert fs.splice_counts == (False, 0, 0)
    assert fs.layer(layer.digest).metrics.disk_hits > 0
