"""The read path through a real FUSE mount: what a read costs, caching, verification.

Counters on the local blob source play the registry's access log: a cache hit must not
reach it, and a small read must fetch a small part of the blob.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import time

import pytest

from stargz.errors import Unavailable
from stargz.fs import LocalLayerSource

from .conftest import corrupt_first_chunk


def _read(path, *, direct: bool = False) -> bytes:
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    try:
        out = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                return b"".join(out)
            out.append(b)
    finally:
        os.close(fd)


def _drop_page_cache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _content(layout_layer, path: str) -> bytes:
    from stargz.estargz import open_file

    with open_file(str(layout_layer.path)) as r:
        node = r.lookup(path)
        return r.read(node.id, 0, node.entry.size)


def test_small_read_fetches_little_and_second_read_hits_cache(fs_env, corners, corners_source):
    # the daemon serves every read (with passthrough the kernel would read the cache file)
    fs = fs_env.start(corners_source, passthrough=False)
    layer = corners.layers("esgz")[0]
    mp = fs_env.mount(layer)
    after_mount = corners_source.bytes_by_digest[layer.digest]
    assert after_mount <= 64 << 10  # footer + TOC only

    want = _content(layer, "data/xattr-file")
    assert (mp / "data/xattr-file").read_bytes() == want
    fetched = corners_source.bytes_by_digest[layer.digest]
    m = fs.layer(layer.digest).metrics
    assert m.on_demand_fetches == 1 and m.cache_misses >= 1
    # one widened range (chunk_size = 50000) plus the tail: a few percent of 5.4 MB
    assert fetched < 0.05 * layer.size, (fetched, layer.size)

    requests = corners_source.requests
    _drop_page_cache(mp / "data/xattr-file")
    assert (mp / "data/xattr-file").read_bytes() == want
    assert _read(mp / "data/xattr-file", direct=True) == want
    assert corners_source.requests == requests
    assert m.memory_hits >= 2

    # a file in a neighbouring member came with the widened range: no fetch either
    state = (mp / ".stargz-snapshotter" / f"{layer.digest}.json").read_text()
    assert '"fetchedSize"' in state


def test_disk_cache_survives_restart(fs_env, corners, corners_source):
    layer = corners.layers("esgz-64k")[0]
    fs = fs_env.start(corners_source, passthrough=False)  # disk hits are counted by the daemon
    mp = fs_env.mount(layer)
    want = _content(layer, "data/text.txt")
    assert _read(mp / "data/text.txt") == want
    first = fs.layer(layer.digest).metrics
    assert first.on_demand_fetches >= 1
    before = (corners_source.requests, corners_source.bytes_read)

    # the daemon stops without unmounting (SIGTERM / crash): the bind stays, dead
    fs_env.close_fs(unmount=False)
    from stargz.fs import mounts

    assert mounts.is_mountpoint(str(mp))
    with pytest.raises(OSError) as e:
        _read(mp / "data/noise.bin")
    assert e.value.errno == errno.ENOTCONN
    # a new daemon mounts the layer again at the same place, from its disk cache
    fs = fs_env.start(corners_source, passthrough=False)
    fs_env.mount(layer, mp)
    assert _read(mp / "data/text.txt") == want
    m = fs.layer(layer.digest).metrics
    # neither the TOC nor any chunk was fetched again
    assert (corners_source.requests, corners_source.bytes_read) == before
    assert m.on_demand_fetches == 0 and m.disk_hits >= 1
    assert m.disk_cache_rejects == 0
    # something never read is still fetched on demand
    assert len(_read(mp / "data/noise.bin")) == os.stat(mp / "data/noise.bin").st_size
    assert corners_source.bytes_read > before[1]


def test_equal_chunks_are_fetched_once(fs_env, corners, corners_source):
    """A small file is one chunk with the same digest in every tag: fetched once."""
    fs_env.start(corners_source)
    a = corners.layers("esgz")[0]
    b = corners.layers("zstdchunked")[0]
    ma = fs_env.mount(a)
    want = _content(a, "bin/setuid-tool")
    assert (ma / "bin/setuid-tool").read_bytes() == want
    mb = fs_env.mount(b)
    tail_only = corners_source.bytes_by_digest[b.digest]
    assert (mb / "bin/setuid-tool").read_bytes() == want
    assert corners_source.bytes_by_digest[b.digest] == tail_only


def test_corrupt_chunk_gives_eio_and_the_fs_keeps_serving(fs_env, corners, tmp_path):
    from stargz.estargz import open_file

    layer = corners.layers("esgz")[0]
    bad = corrupt_first_chunk(layer, tmp_path / "bad-blob", "data/noise.bin")
    with open_file(str(bad)) as r:
        row = r.chunk_rows(r.lookup("data/noise.bin").id, 0, 1)[0]
    source = LocalLayerSource(blobs={layer.digest: bad})
    fs = fs_env.start(source)
    mp = fs_env.mount(layer)

    with pytest.raises(OSError) as e:
        _read(mp / "data/noise.bin")
    assert e.value.errno == errno.EIO
    m = fs.layer(layer.digest).metrics
    # (the kernel retries a failed readahead with a single-page read: 1 or 2 attempts)
    failures = m.verification_failures
    assert failures >= 1 and m.read_errors >= 1
    key = fs.layer(layer.digest).index.keys[row]
    assert key not in fs.disk and key not in fs.memory

    # other files are fine, and the filesystem still answers
    assert (mp / "data/text.txt").read_bytes() == _content(layer, "data/text.txt")
    assert os.listdir(mp / "data")

    # the bad chunk was not cached: the next read fetches it again (and fails again)
    requests = source.requests
    with pytest.raises(OSError) as e:
        _read(mp / "data/noise.bin", direct=True)
    assert e.value.errno == errno.EIO
    assert source.requests > requests
    assert m.verification_failures > failures
    assert fs.metrics.handler_errors == 0


class _FlipOnce:
    """A blob whose first range read, once ``armed``, comes back with one byte inverted (a
    bit flipped on the way); every other read is the blob's own bytes."""

    def __init__(self, blob) -> None:
        self._blob = blob
        self.armed = False
        self.flipped = 0

    @property
    def size(self) -> int:
        return self._blob.size

    async def read_ranges(self, ranges):
        datas = await self._blob.read_ranges(ranges)
        if self.armed and not self.flipped and datas and len(datas[0]) > 1:
            self.flipped += 1
            d = bytearray(datas[0])
            d[len(d) // 2] ^= 0xFF
            datas = [bytes(d), *datas[1:]]
        return datas

    async def check(self) -> None:
        await self._blob.check()

    def close(self) -> None:
        self._blob.close()


class _FlipOnceSource(LocalLayerSource):
    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.blobs_made: list[_FlipOnce] = []

    async def resolve(self, ref, digest, labels):
        blob = _FlipOnce(await super().resolve(ref, digest, labels))
        self.blobs_made.append(blob)
        return blob


def test_a_chunk_damaged_once_on_the_way_is_fetched_again_not_an_eio(fs_env, corners):
    """One answer comes back with a flipped byte: the chunk fails its digest, is neither
    served nor cached, and is fetched once more; the read gets the right bytes. (It was an
    EIO, though a second fetch would have succeeded; a chunk that fails twice is still an
    EIO: test_corrupt_chunk_gives_eio_and_the_fs_keeps_serving.)"""
    layer = corners.layers("esgz")[0]
    source = _FlipOnceSource(layouts=[corners.root])
    fs = fs_env.start(source)
    mp = fs_env.mount(layer)
    (blob,) = source.blobs_made
    blob.armed = True
    assert _read(mp / "data/noise.bin", direct=True) == _content(layer, "data/noise.bin")
    assert blob.flipped == 1
    m = fs.layer(layer.digest).metrics
    assert m.verification_failures == 1 and m.read_errors == 0


def test_prefetch_landmark_and_notify_store(fs_env, busybox):
    layer = next(x for x in busybox.layers("opt"))
    source = LocalLayerSource(layouts=[busybox.root])
    # notify_store is how the daemon serves a prefetched file; with passthrough the kernel
    # reads the verified cache file itself and nothing is pushed
    fs = fs_env.start(source, passthrough=False, wait_prefetch_on_check=True)
    mp = fs_env.mount(layer)
    fs_env.run(fs.check(str(mp), {}))  # waits for the prefetch (as Go's does)
    lay = fs.layer(layer.digest)
    assert lay.prefetch_done.is_set()
    assert lay.prefetch_size == lay.reader.prefetch_size > 0
    assert lay.metrics.prefetch_bytes >= lay.prefetch_size * 0.9
    requests = source.requests
    data = (mp / "bin/busybox").read_bytes()
    assert data == _content(layer, "bin/busybox")
    assert source.requests == requests
    assert lay.metrics.on_demand_fetches == 0
    # the prefetched file was handed to the page cache when it was opened
    assert lay.metrics.notify_store_bytes >= len(data)


def test_landmark_beats_label_and_noprefetch_disables(fs_env, corners, busybox):
    layer = corners.layers("esgz")[0]
    fs = fs_env.start(LocalLayerSource(layouts=[corners.root]))
    # the layer's .no.prefetch.landmark wins over the label
    mp = fs_env.mount(layer, **{"containerd.io/snapshot/remote/stargz.prefetch": "1000000"})
    fs_env.run(fs.check(str(mp), {}))
    assert fs.layer(layer.digest).prefetch_size == 0
    assert fs.layer(layer.digest).metrics.prefetch_bytes == 0
    # noprefetch: even a .prefetch.landmark is ignored
    opt = busybox.layers("opt")[0]
    fs = fs_env.start(LocalLayerSource(layouts=[busybox.root]), noprefetch=True)
    mp = fs_env.mount(opt)
    fs_env.run(fs.check(str(mp), {}))
    assert fs.layer(opt.digest).prefetch_size == 0
    assert fs.layer(opt.digest).metrics.prefetch_bytes == 0


def test_background_fetch_then_registry_gone(fs_env, corners, corners_source):
    layer = corners.layers("esgz-64k")[0]
    fs = fs_env.start(
        corners_source, no_background_fetch=False, background_silence_sec=0.0, max_concurrency=1
    )
    mp = fs_env.mount(layer)
    lay = fs.layer(layer.digest)
    deadline = time.monotonic() + 30
    while not lay.fully_fetched:
        assert time.monotonic() < deadline, lay.state()
        time.sleep(0.05)
    state = (mp / ".stargz-snapshotter" / f"{layer.digest}.json").read_text()
    assert '"fetchedPercent": 100.0' in state
    assert lay.metrics.background_bytes > 0.9 * layer.size - (64 << 10)

    corners_source.fail_reads = Unavailable("registry stopped")
    fs_env.run(fs.check(str(mp), {}))  # fully fetched: no connectivity check needed
    from stargz.estargz import open_file

    with open_file(str(layer.path)) as r:
        for path, node in r.walk():
            if node.type == "reg" and not path.endswith("landmark"):
                got = hashlib.sha256(_read(mp / path)).hexdigest()
                assert got == hashlib.sha256(r.read(node.id, 0, node.entry.size)).hexdigest()
    assert lay.metrics.read_errors == 0


def test_check_detects_unreachable_layer(fs_env, corners, corners_source):
    layer = corners.layers("esgz")[0]
    fs = fs_env.start(corners_source, valid_interval=0)
    mp = fs_env.mount(layer)
    fs_env.run(fs.check(str(mp), {}))
    corners_source.fail_reads = Unavailable("registry stopped")
    with pytest.raises(Unavailable):
        fs_env.run(fs.check(str(mp), {}))
    corners_source.fail_reads = None
    resolves = corners_source.resolves
    fs_env.run(fs.check(str(mp), {}))
    assert corners_source.resolves == resolves  # the old blob works again
    with pytest.raises(Unavailable):
        fs_env.run(fs.check(str(fs_env.mountpoint()), {}))


def test_handler_exception_becomes_eio(fs_env, corners, corners_source):
    layer = corners.layers("esgz")[0]
    fs = fs_env.start(corners_source)
    mp = fs_env.mount(layer)
    m = fs.ops.slots[next(iter(fs.ops.slots))]

    def boom(node_id):
        raise RuntimeError("injected")

    m.tree.readlink = boom
    link = next(p for p, n in m.tree.reader.walk() if n.type == "symlink")
    with pytest.raises(OSError) as e:
        os.readlink(mp / link)
    assert e.value.errno == errno.EIO
    assert fs.metrics.handler_errors == 1
    assert (mp / "data/xattr-file").read_bytes()  # still serving


def test_uvloop(uvloop_env, corners, corners_source):
    fs = uvloop_env.start(corners_source)
    l1, l2 = corners.layers("zstdchunked")
    m1, m2 = uvloop_env.mount(l1), uvloop_env.mount(l2)
    assert (m1 / "data/text.txt").read_bytes() == _content(l1, "data/text.txt")
    assert "to-delete" in os.listdir(m2 / "etc")
    assert type(fs.layer(l1.digest)._loop).__module__.startswith("uvloop")


def _resident_pages(path) -> int:
    """Pages of ``path`` in the page cache (mincore(2))."""
    import ctypes
    import mmap

    size = os.path.getsize(path)
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
        vec = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
        view = ctypes.c_char.from_buffer(mm)
        try:
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(view)), ctypes.c_size_t(size), vec):
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del view  # the mmap cannot close while a ctypes object exports it
        return sum(v & 1 for v in vec)


@pytest.mark.parametrize("read_ahead", [True, False])
def test_sequential_read_warms_the_next_chunk_file(fs_env, corners, corners_source, read_ahead):
    """Each chunk is its own cache file, so the disk's read-ahead stops at 4 MiB: a
    sequential reader past the middle of a chunk has the next chunk's file read ahead."""
    layer = corners.layers("esgz")[0]  # data/noise.bin: a 4 MiB chunk, then the rest
    # the read-ahead is the daemon's: with passthrough, a reopened file whose chunks are all
    # cached is read by the kernel from a merged copy and the daemon sees no READ
    fs = fs_env.start(corners_source, read_ahead_next_chunk=read_ahead, passthrough=False)
    mp = fs_env.mount(layer)
    path = mp / "data/noise.bin"
    want = _content(layer, "data/noise.bin")
    assert _read(path, direct=True) == want  # fetched, verified, written to the disk cache
    lay = fs.layer(layer.digest)
    node = lay.reader.lookup("data/noise.bin").id
    lo, hi = lay.chunks.span(node)
    assert hi - lo == 2
    deadline = time.monotonic() + 10
    while not all(fs.disk.is_verified(lay.index.keys[r]) for r in range(lo, hi)):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    second = fs.disk.path(lay.index.keys[lo + 1])
    fs.memory.clear()
    fd = os.open(second, os.O_RDONLY)
    try:
        os.fsync(fd)  # just written: dirty pages would stay
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert _resident_pages(second) == 0
    # the first half of chunk 0, as a sequential reader's read-ahead asks for it
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap

        buf = mmap.mmap(-1, 1 << 20)
        for off in (0, 1 << 20):
            assert os.preadv(fd, [buf], off) == 1 << 20
            assert bytes(buf) == want[off : off + (1 << 20)]
    finally:
        os.close(fd)
    deadline = time.monotonic() + 2
    while read_ahead and _resident_pages(second) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (_resident_pages(second) > 0) == read_ahead


class _CountingKeys:
    """A layer's chunk keys, counting lookups (a walk over the layer's chunks shows up)."""

    def __init__(self, keys) -> None:
        self.keys, self.lookups = keys, 0

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, r: int) -> str:
        self.lookups += 1
        return self.keys[r]


def test_fetched_size_is_a_counter_that_follows_eviction_by_another_layer(fs_env, corners):
    """The state file (read on every GETATTR/READ of it) reports the fetched size without
    walking the layer's chunks, and stays right when another layer's chunks evict ours
    from the shared disk cache."""
    import json

    fs = fs_env.start(LocalLayerSource(layouts=[corners.root]), disk_cache_max_bytes=4 << 20)
    a_layer, b_layer = corners.layers("esgz")[0], corners.layers("esgz-64k")[0]
    a, b = fs_env.mount(a_layer), fs_env.mount(b_layer)
    lay = fs.layer(str(a))
    idx = lay.index
    state_file = a / ".stargz-snapshotter" / f"{a_layer.digest}.json"

    def reported() -> int:
        return json.loads(_read(state_file, direct=True))["fetchedSize"]

    async def truth() -> int:  # counted from scratch, on the loop (the cache index lives there)
        on_disk = [
            all(idx.keys[r] in fs.disk for r in idx.member_rows(m)) for m in range(idx.n_members)
        ]
        if all(on_disk):
            return lay.size
        held = sum(idx.m_end[m] - idx.m_start[m] for m in range(idx.n_members) if on_disk[m])
        return lay.size - idx.toc_offset + held

    base = reported()
    assert base == fs_env.run(truth())
    path = "data/text.txt"
    assert _read(a / path) == _content(a_layer, path)
    key = idx.keys[lay.chunks.span(lay.reader.lookup(path).id)[0]]
    deadline = time.monotonic() + 10
    while key not in fs.disk:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with_text = reported()
    assert with_text == fs_env.run(truth()) > base

    # nothing changed in the cache: no walk over the chunks, however often it is asked
    counting = _CountingKeys(idx.keys)
    idx.keys = counting

    async def ask(n: int) -> list[int]:
        return [lay.fetched_size() for _ in range(n)]

    try:
        assert set(fs_env.run(ask(200))) == {with_text}
        assert reported() == with_text
        assert counting.lookups == 0
    finally:
        idx.keys = counting.keys

    # another layer's chunks push ours out of the (4 MiB) disk cache
    evictions = fs.metrics.disk_evictions
    assert _read(b / "data/noise.bin") == _content(b_layer, "data/noise.bin")
    deadline = time.monotonic() + 10
    while key in fs.disk:
        assert time.monotonic() < deadline, "the other layer's chunks did not evict ours"
        time.sleep(0.02)
    assert fs.metrics.disk_evictions > evictions
    after = reported()
    assert after == fs_env.run(truth()) < with_text


class _WatchingWriter:
    """The cache writer executor, measuring the disk cache's files on disk right after each
    write job, in the writer thread: before the event loop has run the job's commit."""

    def __init__(self, inner, cache_dir: str) -> None:
        self.inner, self.cache_dir = inner, cache_dir
        self.peak = self.jobs = 0

    def _on_disk(self) -> int:
        total = 0
        for sub in ("chunks", "merged"):
            for dp, _, fns in os.walk(os.path.join(self.cache_dir, sub)):
                for fn in fns:
                    with contextlib.suppress(OSError):
                        total += os.lstat(os.path.join(dp, fn)).st_size
        return total

    def submit(self, fn, *args, **kw):
        def job():
            try:
                return fn(*args, **kw)
            finally:
                self.jobs += 1
                self.peak = max(self.peak, self._on_disk())

        return self.inner.submit(job)

    def shutdown(self, *a, **kw) -> None:
        self.inner.shutdown(*a, **kw)


def test_disk_cache_files_never_pass_the_bound_while_a_write_is_in_flight(fs_env, corners):
    """The chunk files on disk stay within ``max_size_bytes`` at every moment, not only
    once the commit after a write has evicted: a full 1 MiB cache receiving a batch of
    64 KiB chunks (a sequential read of the 5.2 MB noise.bin) is measured right after each
    write job and before its commit. (When the writer renamed each chunk into chunks/
    itself, chunks/ held the whole batch on top of a full cache until the commit.)"""
    bound = 1 << 20
    fs = fs_env.start(LocalLayerSource(layouts=[corners.root]), disk_cache_max_bytes=bound)
    watch = _WatchingWriter(fs._writer, fs.cache_dir)
    fs._writer = watch
    layer = corners.layers("esgz-64k")[0]
    mp = fs_env.mount(layer)
    want = _content(layer, "data/noise.bin")
    for _ in range(2):
        assert _read(mp / "data/noise.bin", direct=True) == want
    deadline = time.monotonic() + 10
    lay = fs.layer(str(mp))
    while fs_env.run(_busy(lay)):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert watch.jobs > 2 and fs.metrics.disk_evictions > 0
    assert watch.peak <= bound, (watch.peak, bound)
    assert fs.disk.bytes <= bound


async def _busy(layer) -> bool:
    return layer.fetcher.busy


def test_disk_cache_bound_counts_the_blocks_tiny_files_take(fs_env, corners):
    """``max_size_bytes`` bounds the disk space of the cache's files: 64 chunk files of
    100 bytes each take a filesystem block apiece (4 KiB here), so a 16 KiB bound keeps 4
    of them, and their blocks on disk (``st_blocks``) stay within it. (Counted by their
    length, all 64 fitted: 6.4 KB counted, 256 KiB on disk.)"""
    bound = 16 << 10
    fs = fs_env.start(LocalLayerSource(layouts=[corners.root]), disk_cache_max_bytes=bound)
    block = os.statvfs(fs.cache_dir).f_frsize
    assert block > 100

    async def fill() -> None:
        for i in range(64):
            key = hashlib.sha256(str(i).encode()).hexdigest()
            assert fs.disk.commit(key, 100, fs.disk.write_tmp(key, bytes([i]) * 100))

    fs_env.run(fill())
    on_disk = 0
    for dp, _, fns in os.walk(os.path.join(fs.cache_dir, "chunks")):
        for fn in fns:
            on_disk += os.lstat(os.path.join(dp, fn)).st_blocks * 512
    assert on_disk <= bound, (on_disk, bound)
    assert len(fs.disk) == bound // block and fs.disk.bytes <= bound
    assert fs.metrics.disk_evictions == 64 - bound // block
