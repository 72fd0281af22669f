"""Pieces of the filesystem that need no mount: labels, caches, scheduler, options."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import xxhash

from stargz.errors import InvalidArgument
from stargz.fs import FsOptions, layer_spec
from stargz.fs.cache import DiskCache, MemoryLRU
from stargz.fs.scheduler import Scheduler
from stargz.fs.source import (
    CRI_IMAGE_LAYERS_LABEL,
    CRI_IMAGE_REF_LABEL,
    CRI_LAYER_DIGEST_LABEL,
    PREFETCH_SIZE_LABEL,
    SKIP_VERIFY_LABEL,
    STARGZ_DIGEST_LABEL,
    STARGZ_REFERENCE_LABEL,
    TOC_DIGEST_LABEL,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
TOC = "sha256:" + "a" * 64


def test_labels_cri_first_then_stargz():
    both = {
        CRI_IMAGE_REF_LABEL: "reg/cri:1",
        CRI_LAYER_DIGEST_LABEL: D1,
        CRI_IMAGE_LAYERS_LABEL: f"{D1},{D2}",
        STARGZ_REFERENCE_LABEL: "reg/sgz:1",
        STARGZ_DIGEST_LABEL: D2,
        TOC_DIGEST_LABEL: TOC,
        PREFETCH_SIZE_LABEL: "10485760",
    }
    spec = layer_spec(both)
    assert (spec.ref, spec.digest, spec.toc_digest) == ("reg/cri:1", D1, TOC)
    assert spec.prefetch_size == 10 << 20 and spec.neighbours == (D2,)
    only_stargz = {k: v for k, v in both.items() if not k.startswith("containerd.io/snapshot/cri")}
    spec = layer_spec(only_stargz)
    assert (spec.ref, spec.digest) == ("reg/sgz:1", D2)


def test_labels_verification_rules():
    base = {STARGZ_REFERENCE_LABEL: "r/x:1", STARGZ_DIGEST_LABEL: D1}
    with pytest.raises(InvalidArgument, match="digest of TOC JSON must be passed"):
        layer_spec(base)
    with pytest.raises(InvalidArgument, match="digest of TOC JSON must be passed"):
        layer_spec({**base, SKIP_VERIFY_LABEL: "true"})  # not allowed by config
    assert layer_spec({**base, SKIP_VERIFY_LABEL: "true"}, allow_no_verification=True).skip_verify
    assert layer_spec(base, disable_verification=True).toc_digest is None
    with pytest.raises(InvalidArgument, match="no layer source"):
        layer_spec({TOC_DIGEST_LABEL: TOC})
    with pytest.raises(InvalidArgument, match="not a sha256"):
        layer_spec({**base, STARGZ_DIGEST_LABEL: "sha256:xyz", TOC_DIGEST_LABEL: TOC})
    with pytest.raises(InvalidArgument, match="not an integer"):
        layer_spec({**base, TOC_DIGEST_LABEL: TOC, PREFETCH_SIZE_LABEL: "lots"})


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


def test_scheduler_background_waits_for_quiet():
    async def main():
        s = Scheduler(1, silence=0.2, read_silence=0.05)
        order = []

        async def background():
            async with s.background():
                order.append(("bg", time.monotonic()))

        async with s.prioritized():
            task = asyncio.create_task(background())
            await asyncio.sleep(0.1)
            assert not order  # paused while a prioritized task runs
            t_end = time.monotonic()
        await task
        assert order and order[0][1] - t_end >= 0.19  # and for the quiet period after

    asyncio.run(main())


def test_options_from_config():
    from stargz import config

    cfg = config.loads(
        "noprefetch = true\nprefetch_timeout_sec = 3\n"
        "[blob]\nchunk_size = 1000\ncheck_always = true\n"
        "[fuse]\nattr_timeout = 5\n[directory_cache]\nmax_cache_fds = 3\n"
    )
    o = FsOptions.from_config(cfg)
    assert o.noprefetch and o.prefetch_timeout_sec == 3 and o.chunk_size == 1000
    assert o.valid_interval == 0 and o.attr_timeout == 5 and o.max_cache_fds == 3
    assert FsOptions.from_config(None) == FsOptions()
    assert FsOptions.from_config(cfg, noprefetch=False).noprefetch is False


def test_packed_entry_answers_like_entry_attributes():
    """The walk's fast path (`pack_entry`) packs exactly what EntryAttributes packs."""
    import stat as st

    from stargz.fuse.protocol import EntryAttributes, pack_entry

    for fields, mtime in (
        ((st.S_IFREG | 0o644, 1, 1000, 1000, 0, 12345), 1_600_000_000_123_456_789),
        ((st.S_IFCHR, 1, 0, 0, 0, 0), 0),
        ((st.S_IFBLK | 0o600, 1, 0, 6, (8 << 8) | 1, 0), -1_500_000_000),
        ((st.S_IFDIR | 0o755, 7, 0, 0, 0, 0), 1),
    ):
        a = EntryAttributes()
        a.st_ino = (3 << 32) | 77
        a.st_mode, a.st_nlink, a.st_uid, a.st_gid, a.st_rdev, a.st_size = fields
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mtime
        a.entry_timeout, a.attr_timeout = 1.5, 0.25
        p = pack_entry(a.st_ino, 1.5, 0.25, fields, mtime, 4096)
        assert p.entry_out() == a.entry_out()
        assert p.attr_out() == a.attr_out()
        assert (p.st_ino, p.st_mode) == (a.st_ino, a.st_mode)
