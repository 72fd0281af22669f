"""FUSE passthrough (``[fuse] passthrough = true``): verified single-chunk files are read
by the kernel straight from the disk cache, and never in a way the kernel would refuse.

Ground truth is the layer blob unpacked by Python's tarfile (`tar_tree`), not our reader.
Needs a kernel with CONFIG_FUSE_PASSTHROUGH (>= 6.9); on an older kernel these tests are
skipped with that reason (the daemon then serves every read itself, which every other
read-path test covers).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import subprocess
import time

import pytest
from conftest import tar_tree

from stargz.estargz.toc import TOC_TAR_NAME
from stargz.fs.tree import _HIDDEN_AT_ROOT

from .conftest import corrupt_first_chunk


def _sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _regular(truth: dict) -> dict[str, dict]:
    # (the TOC and landmark files are hidden by the mount; whiteouts are not regular there)
    return {
        p: r
        for p, r in truth.items()
        if r.get("type") == "reg"
        and not os.path.basename(p).startswith(".wh.")
        and p not in _HIDDEN_AT_ROOT
        and p != TOC_TAR_NAME
    }


def _start(fs_env, source):
    fs = fs_env.start(source, passthrough=True)
    if not fs._session.passthrough:
        pytest.skip("this kernel does not offer FUSE passthrough (needs >= 6.9)")
    return fs


def _wait_passthrough(fs, path, before: int, timeout: float = 10.0) -> bool:
    """Open ``path`` until an open is a passthrough one (the cache writer is async)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, "rb"):
            pass
        if fs.metrics.passthrough_opens > before:
            return True
        time.sleep(0.05)
    return False


def test_verified_files_are_read_by_the_kernel(fs_env, corners, corners_source):
    layer = corners.layers("esgz-64k")[0]
    truth = _regular(tar_tree(layer.path))
    fs = _start(fs_env, corners_source)
    mp = fs_env.mount(layer)
    lay = fs.layer(layer.digest)
    # first pass: through the daemon (fetch, verify, cache; closing a multi-chunk file
    # that is now wholly cached merges it for passthrough)
    for p, rec in truth.items():
        assert _sha(mp / p) == rec["sha256"], p
    sizes = [rec["size"] for rec in truth.values()]
    assert any(0 < n <= 64 << 10 for n in sizes), "no single-chunk file in the fixture"
    assert any(n > 64 << 10 for n in sizes), "no multi-chunk file in the fixture"
    nonempty = [p for p, rec in truth.items() if rec["size"] > 0]
    for p in nonempty:
        assert _wait_passthrough(fs, mp / p, fs.metrics.passthrough_opens), p

    # second pass, page cache dropped: every file by passthrough, same bytes, and the
    # daemon answers no READ
    reads = lay.metrics.reads
    opens = fs.metrics.passthrough_opens
    for p in nonempty:
        fd = os.open(mp / p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        assert _sha(mp / p) == truth[p]["sha256"], p
    assert fs.metrics.passthrough_opens == opens + 2 * len(nonempty)
    assert lay.metrics.reads == reads
    # merged copies are disk cache files: they stay after the layer is unmounted
    merged = os.listdir(fs_env.root / "cache" / "merged")
    assert merged
    fs_env.run(fs.unmount(str(mp)))
    assert sorted(os.listdir(fs_env.root / "cache" / "merged")) == sorted(merged)


def test_an_open_file_keeps_its_mode(fs_env, corners, corners_source):
    """The kernel refuses a passthrough open of an inode that is open in cached mode
    (and the reverse): while a cached open lasts, new opens stay cached."""
    layer = corners.layers("esgz-64k")[0]
    truth = _regular(tar_tree(layer.path))
    path = next(p for p, rec in truth.items() if 0 < rec["size"] <= 64 << 10)
    fs = _start(fs_env, corners_source)
    mp = fs_env.mount(layer)
    held = open(mp / path, "rb")  # cached mode: nothing is verified yet
    try:
        assert hashlib.sha256(held.read()).hexdigest() == truth[path]["sha256"]
        time.sleep(0.5)  # let the cache writer put the chunk on disk
        before = fs.metrics.passthrough_opens
        for _ in range(3):
            with open(mp / path, "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == truth[path]["sha256"]
        assert fs.metrics.passthrough_opens == before
    finally:
        held.close()
    # every cached open is released: the next open may pass through
    assert _wait_passthrough(fs, mp / path, fs.metrics.passthrough_opens)
    assert _sha(mp / path) == truth[path]["sha256"]


def test_corrupt_chunk_is_never_passed_through(fs_env, corners, tmp_path):
    """A chunk that fails its digest is never cached, so never becomes a backing file."""
    from stargz.fs import LocalLayerSource

    layer = corners.layers("esgz-64k")[0]
    truth = _regular(tar_tree(layer.path))
    victim = max(
        (p for p, rec in truth.items() if rec["size"] <= 64 << 10), key=lambda p: truth[p]["size"]
    )
    bad = corrupt_first_chunk(layer, tmp_path / "bad-blob", victim)
    fs = _start(fs_env, LocalLayerSource(blobs={layer.digest: bad}))
    mp = fs_env.mount(layer)
    for _ in range(3):
        with pytest.raises(OSError) as e:
            (mp / victim).read_bytes()
        assert e.value.errno == errno.EIO
        time.sleep(0.2)
    assert fs.metrics.passthrough_opens == 0
    # a good file next to it still passes through once verified
    good = next(p for p, rec in truth.items() if p != victim and 0 < rec["size"] <= 64 << 10)
    assert _sha(mp / good) == truth[good]["sha256"]
    assert _wait_passthrough(fs, mp / good, 0)
    assert _sha(mp / good) == truth[good]["sha256"]


# --- merged files across restarts and under the disk bound ------------------------------------

TEXT = "data/text.txt"  # 34 chunks (2.2 MB) in the esgz-64k layer
NOISE = "data/noise.bin"  # 81 chunks (5.3 MB)


def _wait(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _merged_key(fs, layer, path: str) -> str:
    lay = fs.layer(layer.digest)
    return lay.index.merged_key(lay.reader.lookup(path).id)


def _merge_once(fs_env, fs, mp, layer, truth) -> str:
    """Read TEXT through the daemon, wait for its merged copy and a passthrough open."""
    assert _sha(mp / TEXT) == truth[TEXT]["sha256"]
    # (merged on a release that finds every chunk written: reopen until it passes through)
    assert _wait_passthrough(fs, mp / TEXT, fs.metrics.passthrough_opens)
    key = _merged_key(fs, layer, TEXT)
    assert key in fs.disk
    return key


def test_merged_file_survives_a_restart_and_is_checked_first(fs_env, corners, corners_source):
    layer = corners.layers("esgz-64k")[0]
    truth = _regular(tar_tree(layer.path))
    fs = _start(fs_env, corners_source)
    mp = fs_env.mount(layer)
    key = _merge_once(fs_env, fs, mp, layer, truth)
    merged = fs.disk.path(key)
    ino = os.stat(merged).st_ino
    assert os.path.dirname(merged) == str(fs_env.root / "cache" / "merged")
    fs_env.close_fs(unmount=False)

    fs = _start(fs_env, corners_source)
    fs_env.mount(layer, mp)
    assert key in fs.disk and not fs.disk.is_verified(key)
    # the first open is served by the daemon while the merged file is checked
    assert _sha(mp / TEXT) == truth[TEXT]["sha256"]
    assert fs.metrics.passthrough_opens == 0
    assert _wait(lambda: fs.disk.is_verified(key))
    assert _wait_passthrough(fs, mp / TEXT, 0)
    assert os.stat(merged).st_ino == ino  # the kept file, not merged again
    lay = fs.layer(layer.digest)
    reads = lay.metrics.reads
    fd = os.open(mp / TEXT, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert _sha(mp / TEXT) == truth[TEXT]["sha256"]
    assert lay.metrics.reads == reads  # the kernel read the merged file itself
    assert fs.metrics.cache_checksum_failures == 0


def test_flipped_merged_file_is_dropped_and_merged_again(fs_env, corners, corners_source):
    layer = corners.layers("esgz-64k")[0]
    truth = _regular(tar_tree(layer.path))
    fs = _start(fs_env, corners_source)
    mp = fs_env.mount(layer)
    key = _merge_once(fs_env, fs, mp, layer, truth)
    merged = fs.disk.path(key)
    fs_env.close_fs(unmount=False)
    with open(merged, "r+b") as f:
        f.seek(1 << 20)
        b = f.read(1)
        f.seek(1 << 20)
        f.write(bytes([b[0] ^ 0x55]))

    fs = _start(fs_env, corners_source)
    fs_env.mount(layer, mp)
    assert _sha(mp / TEXT) == truth[TEXT]["sha256"]
    assert _wait(lambda: fs.metrics.cache_checksum_failures == 1)
    assert fs.metrics.passthrough_opens == 0
    # merged again from the (checked) chunks on a later release, then passed through
    assert _wait_passthrough(fs, mp / TEXT, 0)
    assert _sha(merged) == truth[TEXT]["sha256"]  # (the damaged one was deleted)
    fd = os.open(mp / TEXT, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert _sha(mp / TEXT) == truth[TEXT]["sha256"]
    assert fs.metrics.cache_checksum_failures == 1


def test_merged_files_are_evicted_under_the_disk_bound(fs_env, corners, corners_source):
    """A merged file counts toward max_size_bytes and leaves with the LRU; its node is then
    served by the daemon again, but only once no passthrough open of it lasts (the kernel
    would refuse a cached open next to one)."""
    layer = corners.layers("esgz-64k")[0]
    truth = _regular(tar_tree(layer.path))
    bound = 3 << 20
    fs = fs_env.start(corners_source, passthrough=True, disk_cache_max_bytes=bound)
    if not fs._session.passthrough:
        pytest.skip("this kernel does not offer FUSE passthrough (needs >= 6.9)")
    mp = fs_env.mount(layer)
    key = _merge_once(fs_env, fs, mp, layer, truth)
    size = os.stat(fs.disk.path(key)).st_size
    assert fs.disk.size_of(key) == size == truth[TEXT]["size"]
    assert fs.disk.bytes <= bound

    held = open(mp / TEXT, "rb")  # a passthrough open that lasts through the eviction
    try:
        opens = fs.metrics.passthrough_opens
        assert opens > 0
        # reading another big file pushes the merged file out of the cache
        assert _sha(mp / NOISE) == truth[NOISE]["sha256"]
        assert _wait(lambda: key not in fs.disk)
        assert not os.path.exists(fs.disk.path(key))
        assert fs.disk.bytes <= bound and fs.metrics.disk_evictions > 0
        # while `held` lasts, new opens stay passthrough (same bytes, from the kernel's
        # reference to the deleted file)
        with open(mp / TEXT, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == truth[TEXT]["sha256"]
        assert fs.metrics.passthrough_opens == opens + 1
        assert hashlib.sha256(held.read()).hexdigest() == truth[TEXT]["sha256"]
    finally:
        held.close()
    slot = next(s for s, m in fs.ops.slots.items() if m.layer is fs.layer(layer.digest))
    mounted = fs.ops.slots[slot]
    node = fs.layer(layer.digest).reader.lookup(TEXT).id
    assert _wait(lambda: node not in mounted.backing)  # let go once the last open closed
    opens = fs.metrics.passthrough_opens
    assert _sha(mp / TEXT) == truth[TEXT]["sha256"]  # the daemon serves it again
    assert fs.metrics.passthrough_opens == opens
    assert fs.disk.bytes <= bound


# --- the mode: [fuse] passthrough = "auto" (the default), true, false --------------------------


def _mode_lines(caplog) -> list:
    return [r for r in caplog.records if r.getMessage().startswith("FUSE passthrough")]


def _offered(fs) -> bool:
    from stargz.fuse import protocol

    return bool(fs._session.conn.offered & protocol.PASSTHROUGH)


def test_the_default_is_auto_and_on_where_the_kernel_offers_it(
    fs_env, corners, corners_source, caplog
):
    caplog.set_level(logging.INFO, logger="stargz.fs")
    layer = corners.layers("esgz-64k")[0]
    truth = _regular(tar_tree(layer.path))
    path = next(p for p, rec in truth.items() if 0 < rec["size"] <= 64 << 10)
    fs = fs_env.start(corners_source)  # the product's defaults, nothing about passthrough
    (line,) = _mode_lines(caplog)
    assert line.mode == "auto"
    if not _offered(fs):
        # an older kernel: off, and no warning (nobody asked for it)
        assert fs.ops.passthrough is None and line.passthrough is False
        assert line.levelno == logging.INFO and "does not offer" in line.reason
        return
    assert fs.ops.passthrough is not None and fs._session.passthrough
    assert line.passthrough is True and line.levelno == logging.INFO
    mp = fs_env.mount(layer)
    assert _sha(mp / path) == truth[path]["sha256"]  # fetched and verified by the daemon
    assert _wait_passthrough(fs, mp / path, fs.metrics.passthrough_opens)
    assert _sha(mp / path) == truth[path]["sha256"]


def test_false_keeps_every_read_in_the_daemon(fs_env, corners, corners_source, caplog):
    caplog.set_level(logging.INFO, logger="stargz.fs")
    layer = corners.layers("esgz-64k")[0]
    truth = _regular(tar_tree(layer.path))
    path = next(p for p, rec in truth.items() if 0 < rec["size"] <= 64 << 10)
    fs = fs_env.start(corners_source, passthrough=False)
    (line,) = _mode_lines(caplog)
    assert (line.mode, line.passthrough, line.levelno) == ("false", False, logging.INFO)
    assert fs.ops.passthrough is None and not fs._session.passthrough  # not even asked in INIT
    mp = fs_env.mount(layer)
    lay = fs.layer(layer.digest)
    assert _sha(mp / path) == truth[path]["sha256"]
    time.sleep(0.3)  # the chunk is on disk and verified: passthrough could take it now
    reads = lay.metrics.reads
    for _ in range(3):
        fd = os.open(mp / path, os.O_RDONLY | os.O_DIRECT)
        try:
            assert os.read(fd, 1 << 16)
        finally:
            os.close(fd)
    assert fs.metrics.passthrough_opens == 0
    assert lay.metrics.reads >= reads + 3


def _overlay(lower: str, target, *more: str) -> subprocess.CompletedProcess:
    opts = "lowerdir=" + ":".join([lower, *more])
    return subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(target)],
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize("mode", ["auto", True])
def test_a_cache_on_overlayfs_cannot_back_files(fs_env, corners, corners_source, caplog, mode):
    """FUSE takes a backing file only from a file system stacked less deep than itself:
    a daemon root on overlayfs (a daemon in a container) gets ELOOP. "auto" sees the
    overlayfs and does not ask for passthrough in INIT (asking would cost the mount a level
    of stacking for nothing); true asks, the start-up probe is refused, and it warns.
    Either way the mount serves every read instead of failing opens later."""
    caplog.set_level(logging.INFO, logger="stargz.fs")
    dirs = {n: fs_env.base / n for n in ("lower", "upper", "work", "empty", "o1", "o2")}
    for d in dirs.values():
        d.mkdir()
    fs_env.root.mkdir()
    opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, fs_env.root], check=True)
    layer = corners.layers("esgz-64k")[0]
    truth = _regular(tar_tree(layer.path))
    path = next(p for p, rec in truth.items() if 0 < rec["size"] <= 64 << 10)
    fs = fs_env.start(corners_source, passthrough=mode)
    if not _offered(fs):
        pytest.skip("this kernel does not offer FUSE passthrough (needs >= 6.9)")
    (line,) = _mode_lines(caplog)
    assert line.passthrough is False and fs.ops.passthrough is None
    if mode == "auto":
        assert line.levelno == logging.INFO and "is on overlayfs" in line.reason, line.reason
        assert not fs._session.passthrough  # not asked for in INIT
        # so the FUSE mount stacks like one without passthrough: overlayfs twice over it
        assert _overlay(fs.fuse_dir, dirs["o1"], str(dirs["empty"])).returncode == 0
        nested = _overlay(str(dirs["o1"]), dirs["o2"], str(dirs["empty"]))
        assert nested.returncode == 0, nested.stderr
    else:
        assert line.levelno == logging.WARNING, line
        assert "refused a backing file" in line.reason, line.reason
        probes = [n for n in os.listdir(fs.disk.tmp_path("x").rpartition("/")[0]) if "probe" in n]
        assert probes == []  # the probe cleaned up
    mp = fs_env.mount(layer)
    for _ in range(3):
        assert _sha(mp / path) == truth[path]["sha256"]
        time.sleep(0.1)
    assert fs.metrics.passthrough_opens == 0 and fs.metrics.handler_errors == 0
