"""The memory LRU and the disk cache: bounds, restart, temporary files, checksums."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
import xxhash

from stargz.fs.cache import DiskCache, MemoryLRU


def test_memory_lru_is_bounded_in_bytes():
    lru = MemoryLRU(100)
    lru.put("a", b"x" * 40)
    lru.put("b", b"y" * 40)
    assert lru.get("a") is not None  # a is now the most recent
    lru.put("c", b"z" * 40)
    assert "b" not in lru and "a" in lru and "c" in lru
    assert lru.bytes == 80
    lru.put("big", b"w" * 101)  # larger than the bound: not kept
    assert "big" not in lru and lru.bytes == 80


def test_disk_cache_bound_restart_and_tmp_cleanup(tmp_path):
    root = str(tmp_path / "cache")
    dc = DiskCache(root, max_bytes=250)
    dc.load()
    for i, key in enumerate(["aa" + "0" * 62, "bb" + "0" * 62, "cc" + "0" * 62]):
        size = dc.write_file(key, bytes([i]) * 100)
        dc.commit(key, size)
        os.utime(dc.path(key), ns=(i * 10**9, i * 10**9))
    # 300 bytes > 250: the least recently used chunk went
    assert "aa" + "0" * 62 not in dc and len(dc) == 2 and dc.bytes == 200
    assert not os.path.exists(dc.path("aa" + "0" * 62))
    assert dc.metrics.disk_evictions == 1
    assert dc.pread("bb" + "0" * 62, 10, 5) == b"\x01" * 5
    # a crash mid-write leaves a temp file: the next start removes it
    with open(os.path.join(root, "tmp", "half-written"), "wb") as f:
        f.write(b"partial")
    dc.close()
    again = DiskCache(root, max_bytes=250)
    again.load()
    assert len(again) == 2 and again.bytes == 200
    assert os.listdir(os.path.join(root, "tmp")) == []
    # chunks found at start are not trusted until re-hashed by the layer
    assert not again.is_verified("bb" + "0" * 62)
    # blob tails round-trip and reject a size mismatch
    again.write_tail("sha256:" + "f" * 64, 90, 100, b"t" * 10)
    assert again.read_tail("sha256:" + "f" * 64, 100) == (90, b"t" * 10)
    assert again.read_tail("sha256:" + "f" * 64, 101) is None
    again.close()


def test_disk_cache_checksums_merged_files_and_tails(tmp_path):
    """Every file carries its xxh3; merged files are indexed at start, count toward the
    bound and leave with the LRU (telling ``on_discard``); a damaged tail is dropped."""
    import struct

    from stargz.fs.cache import CHECK_BAD, CHECK_NO_RECORD, CHECK_OK, XATTR

    root = str(tmp_path / "cache")
    dc = DiskCache(root, max_bytes=350)
    dc.load()
    assert dc.xattrs  # (ext4/xfs/tmpfs: user xattrs are kept)
    chunk, merged = "ab" + "0" * 62, "m-" + "c" * 64 + "-5"
    dc.commit(chunk, dc.write_file(chunk, b"c" * 100))
    tmp = dc.tmp_path("merge")
    with open(tmp, "wb") as f:
        f.write(b"m" * 200)
        dc.record(f.fileno(), xxhash.xxh3_128_digest(b"m" * 200))
    dc.place(tmp, merged)
    dc.commit(merged, 200)
    assert dc.path(merged) == os.path.join(root, "merged", "c" * 64 + "-5")
    dc.close()

    again = DiskCache(root, max_bytes=350)
    again.load()
    assert merged in again and again.bytes == 300 and not again.is_verified(merged)
    assert again.read_checked(merged, want=False) == (CHECK_OK, None)
    assert again.read_checked(chunk) == (CHECK_OK, b"c" * 100)
    with open(again.path(chunk), "r+b") as f:
        f.write(b"X")
    assert again.read_checked(chunk) == (CHECK_BAD, None)
    os.removexattr(again.path(chunk), XATTR)
    assert again.read_checked(chunk)[0] == CHECK_NO_RECORD
    dropped = []
    again.on_discard = dropped.append
    again.touch(chunk)  # the merged file is now the least recently used
    new = "cd" + "0" * 62
    again.commit(new, again.write_file(new, b"n" * 100))
    assert dropped == [merged] and merged not in again and again.bytes == 200
    assert not os.path.exists(os.path.join(root, "merged", "c" * 64 + "-5"))

    # tails: checked by the checksum in their header; the older format still reads
    digest = "sha256:" + "e" * 64
    again.write_tail(digest, 90, 100, b"t" * 10)
    assert again.read_tail(digest, 100) == (90, b"t" * 10)
    path = os.path.join(root, "layers", "sha256-" + "e" * 64)
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"u")
    assert again.read_tail(digest, 100) is None and not os.path.exists(path)
    assert again.metrics.cache_checksum_failures == 1
    with open(path, "wb") as f:
        f.write(struct.pack("<8sQQ", b"STGZTAIL", 90, 100) + b"v" * 10)
    assert again.read_tail(digest, 100) == (90, b"v" * 10)
    again.close()


def test_a_write_to_a_full_cache_disk_leaves_no_partial_file(fuse_host, tmp_path):
    """The cache directory on a 64 KiB tmpfs: a 200 KiB chunk (and a blob tail) cannot be
    written (ENOSPC), and the half-written temp files are gone, so the space they took is
    free for the chunks that fit. (They stayed until the next start: a disk that filled up
    once stayed full of halves.)"""
    root = tmp_path / "cache"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(root)], check=True)
    try:
        dc = DiskCache(str(root), max_bytes=1 << 30)
        dc.load()
        with pytest.raises(OSError) as e:
            dc.write_file("dd" + "0" * 62, b"x" * (200 << 10))
        assert e.value.errno == errno.ENOSPC
        with pytest.raises(OSError):
            dc.write_tail("sha256:" + "e" * 64, 0, 200 << 10, b"t" * (200 << 10))
        assert os.listdir(root / "tmp") == []
        assert dc.write_file("ee" + "0" * 62, b"y" * (16 << 10)) == 16 << 10  # room again
        dc.close()
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def test_place_never_renames_across_directories(tmp_path, monkeypatch):
    """A chunk moves from tmp/ into place without a cross-directory rename: that takes the
    filesystem's rename lock, which an overlayfs copy-up over our mount holds while waiting
    for a FUSE answer from the thread placing the chunk (the daemon deadlocked so in the
    HelloBench nginx run). The file lands whole, with its checksum record; a stale file
    at the final path is replaced."""
    renames = []
    real_rename = os.rename

    def spy(src, dst, *a, **kw):
        renames.append((os.path.dirname(os.fspath(src)), os.path.dirname(os.fspath(dst))))
        return real_rename(src, dst, *a, **kw)

    dc = DiskCache(str(tmp_path / "cache"), max_bytes=0)
    dc.load()
    key = "ab" + "1" * 62
    os.makedirs(os.path.dirname(dc.path(key)), exist_ok=True)
    with open(dc.path(key), "wb") as f:  # a stale leftover, not in the index
        f.write(b"old")
    monkeypatch.setattr(os, "rename", spy)
    tmp = dc.write_tmp(key, b"x" * 5000)
    assert dc.commit(key, 5000, tmp)
    assert [r for r in renames if r[0] != r[1]] == []
    assert not os.path.exists(tmp)
    assert dc.pread(key, 0, 5000) == b"x" * 5000
    assert os.listdir(os.path.join(str(tmp_path / "cache"), "tmp")) == []
