"""Disk cache files found at start are checked against the xxh3-128 recorded when they were
written: damaged ones (a flipped byte: torn write, disk rot, a stray write) are deleted,
counted in ``cache_checksum_failures`` and fetched again; the right bytes are served.

Real FUSE mounts; a restart is closing the filesystem and starting a new one on the same
root. Ground truth is the layer blob read by our reader (`_content`), the same as the
other read-path tests.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable

import xxhash

from stargz.fs import LocalLayerSource
from stargz.fs.cache import XATTR

TEXT = "data/text.txt"  # 34 chunks in the esgz-64k layer
SMALL = "data/many/f0149"  # one chunk


def _content(layout_layer, path: str) -> bytes:
    from stargz.estargz import open_file

    with open_file(str(layout_layer.path)) as r:
        node = r.lookup(path)
        return r.read(node.id, 0, node.entry.size)


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _wait(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _flip(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x55]))


def _keys(fs, layer, path: str) -> list[str]:
    lay = fs.layer(layer.digest)
    lo, hi = lay.chunks.span(lay.reader.lookup(path).id)
    return [lay.index.keys[r] for r in range(lo, hi)]


def _scraped(fs_env, fs, name: str) -> float:
    """``name``'s value as the daemon's Prometheus collector exports it."""
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from stargz.service.metrics import FsCollector

    async def scrape() -> bytes:  # (on the loop thread, as the endpoint does)
        reg = CollectorRegistry()
        reg.register(FsCollector(fs))
        return generate_latest(reg)

    for line in fs_env.run(scrape()).decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not exported")


def _cached(fs, keys: list[str]) -> bool:
    return all(k in fs.disk for k in keys)


def test_flipped_chunk_file_is_refetched(fs_env, corners, corners_source):
    layer = corners.layers("esgz-64k")[0]
    want = _content(layer, TEXT)
    fs = fs_env.start(corners_source)
    mp = fs_env.mount(layer)
    assert _read(mp / TEXT) == want
    keys = _keys(fs, layer, TEXT)
    assert _wait(lambda: _cached(fs, keys))
    victim = fs.disk.path(keys[3])
    # every chunk file carries the xxh3 of its bytes
    with open(victim, "rb") as f:
        good = f.read()
    assert os.getxattr(victim, XATTR) == xxhash.xxh3_128_digest(good)
    fs_env.close_fs(unmount=False)
    _flip(victim, len(good) // 2)

    fs = fs_env.start(corners_source)
    fs_env.mount(layer, mp)
    before = corners_source.bytes_by_digest[layer.digest]
    assert _read(mp / TEXT) == want
    assert fs.metrics.cache_checksum_failures == 1
    assert fs.layer(layer.digest).metrics.disk_cache_rejects == 1
    assert corners_source.bytes_by_digest[layer.digest] > before  # fetched again
    assert _scraped(fs_env, fs, "stargz_fs_cache_checksum_failures_total") == 1.0
    # written again, with the right bytes and a record of them
    assert _wait(lambda: keys[3] in fs.disk and os.path.exists(victim))
    with open(victim, "rb") as f:
        assert f.read() == good
    # every other chunk was checked (xxh3) and served from disk: none refetched
    assert fs.layer(layer.digest).metrics.disk_hits >= len(keys) - 1


def test_unverified_layer_chunk_flipped_on_disk_is_not_served(fs_env, corners):
    """Without a TOC digest nothing but the recorded xxh3 can tell a damaged chunk file:
    before checksums, such a file was trusted blindly and its wrong bytes served."""
    source = LocalLayerSource(layouts=[corners.root])
    layer = corners.layers("esgz-64k")[0]
    want = _content(layer, TEXT)
    fs = fs_env.start(source, disable_verification=True)
    mp = fs_env.mount(layer, toc=False)
    assert _read(mp / TEXT) == want
    keys = _keys(fs, layer, TEXT)
    assert keys[0].startswith("u-")
    assert _wait(lambda: _cached(fs, keys))
    victim = fs.disk.path(keys[5])
    fs_env.close_fs(unmount=False)
    _flip(victim, 10)

    fs = fs_env.start(source, disable_verification=True)
    fs_env.mount(layer, mp, toc=False)
    assert _read(mp / TEXT) == want
    assert fs.metrics.cache_checksum_failures == 1


def test_chunk_without_a_record_is_rehashed(fs_env, corners, corners_source):
    """A chunk file written before checksums existed (no xattr) falls back to the sha256
    re-hash: still trusted when right, dropped when wrong."""
    layer = corners.layers("esgz-64k")[0]
    want = _content(layer, TEXT)
    fs = fs_env.start(corners_source)
    mp = fs_env.mount(layer)
    assert _read(mp / TEXT) == want
    keys = _keys(fs, layer, TEXT)
    assert _wait(lambda: _cached(fs, keys))
    paths = [fs.disk.path(k) for k in keys]
    fs_env.close_fs(unmount=False)
    for p in paths:
        os.removexattr(p, XATTR)
    _flip(paths[7], 1)

    fs = fs_env.start(corners_source)
    fs_env.mount(layer, mp)
    before = corners_source.bytes_by_digest[layer.digest]
    assert _read(mp / TEXT) == want
    m = fs.layer(layer.digest).metrics
    assert m.disk_cache_rejects == 1 and fs.metrics.cache_checksum_failures == 1
    fetched = corners_source.bytes_by_digest[layer.digest] - before
    assert 0 < fetched < 0.2 * len(want)  # one chunk's range, not the file
    # (the refetched chunk is written by the cache writer after it was served)
    assert _wait(lambda: all(fs.disk.is_verified(k) for k in keys))
    for k, p in zip(keys, paths, strict=True):
        with open(p, "rb") as f:
            data = f.read()
        assert hashlib.sha256(data).hexdigest() == k
        # re-hashed once, then recorded: the next start checks it by xxh3
        assert os.getxattr(p, XATTR) == xxhash.xxh3_128_digest(data)


def test_flipped_toc_tail_is_refetched(fs_env, corners, corners_source):
    layer = corners.layers("esgz-64k")[0]
    want = _content(layer, SMALL)
    fs = fs_env.start(corners_source)
    mp = fs_env.mount(layer)
    assert _read(mp / SMALL) == want
    tail = fs_env.root / "cache" / "layers" / layer.digest.replace(":", "-")
    assert tail.is_file()
    fs_env.close_fs(unmount=False)

    # an intact tail: the restart fetches nothing for the TOC
    fs = fs_env.start(corners_source)
    before = corners_source.bytes_by_digest[layer.digest]
    fs_env.mount(layer, mp)
    assert corners_source.bytes_by_digest[layer.digest] == before
    assert fs.metrics.cache_checksum_failures == 0
    fs_env.close_fs(unmount=False)

    _flip(tail, tail.stat().st_size - 100)
    fs = fs_env.start(corners_source)
    before = corners_source.bytes_by_digest[layer.digest]
    fs_env.mount(layer, mp)
    assert _read(mp / SMALL) == want
    assert fs.metrics.cache_checksum_failures == 1
    assert corners_source.bytes_by_digest[layer.digest] > before  # the TOC came again
    # and was stored again, intact
    assert fs.disk.read_tail(layer.digest, layer.size) is not None
    assert fs.metrics.cache_checksum_failures == 1


def test_no_user_xattrs_falls_back_to_sha256(fs_env, corners, corners_source):
    """On a filesystem without user xattrs (ramfs) nothing is recorded; chunks found at
    start are re-hashed, and a damaged one is still never served."""
    import subprocess

    from stargz.fs import mounts

    fs_env.root.mkdir(parents=True)
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(fs_env.root)], check=True)
    try:
        layer = corners.layers("esgz-64k")[0]
        want = _content(layer, TEXT)
        fs = fs_env.start(corners_source)
        assert fs.disk.xattrs is False
        mp = fs_env.mount(layer)
        assert _read(mp / TEXT) == want
        keys = _keys(fs, layer, TEXT)
        assert _wait(lambda: _cached(fs, keys))
        victim = fs.disk.path(keys[2])
        fs_env.close_fs(unmount=False)
        _flip(victim, 3)
        fs = fs_env.start(corners_source)
        fs_env.mount(layer, mp)
        assert _read(mp / TEXT) == want
        assert fs.metrics.cache_checksum_failures == 1
        assert fs.layer(layer.digest).metrics.disk_cache_rejects == 1
    finally:
        fs_env.close_fs()
        mounts.unmount_robust(str(fs_env.root))
