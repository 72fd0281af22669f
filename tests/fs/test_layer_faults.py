"""Reads while things go wrong around them: a layer closed under waiting reads, a stalling
or failing source shared (or not) with other layers.

The blobs are the real fixture files served by `LocalLayerSource`; `GatedSource` sits in
front of it only to stall or fail a chosen source's range reads, a fault a local file
can't produce.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from stargz.errors import Unavailable
from stargz.fs import LocalLayerSource
from stargz.fs.source import STARGZ_REFERENCE_LABEL

REF = "example.test/corners:esgz"  # (what labels_for puts in the labels)


class Gate:
    """Holds range reads while ``stalled``; fails them while ``fail``."""

    def __init__(self) -> None:
        self.stalled = False
        self.fail = False
        self.waiting = 0


class _GatedBlob:
    def __init__(self, blob: Any, gate: Gate) -> None:
        self._blob, self._gate = blob, gate

    @property
    def size(self) -> int:
        return self._blob.size

    async def read_ranges(self, ranges):
        gate = self._gate
        gate.waiting += 1
        try:
            while gate.stalled:
                await asyncio.sleep(0.01)
        finally:
            gate.waiting -= 1
        if gate.fail:
            raise Unavailable("the gated source fails every read")
        return await self._blob.read_ranges(ranges)

    async def check(self) -> None:
        await self._blob.check()

    def close(self) -> None:
        self._blob.close()


class GatedSource(LocalLayerSource):
    """`LocalLayerSource` whose blobs go through the `Gate` that ``pick(ref, digest)``
    names (None: no gate)."""

    def __init__(self, pick: Callable[[str, str], Gate | None], **kw: Any) -> None:
        super().__init__(**kw)
        self.pick = pick

    async def resolve(self, ref, digest, labels):
        blob = await super().resolve(ref, digest, labels)
        gate = self.pick(ref, digest)
        return blob if gate is None else _GatedBlob(blob, gate)


def _read_in_thread(path) -> dict[str, Any]:
    """Read ``path`` (O_DIRECT: past the page cache; into an aligned buffer, as a passthrough
    file's disk requires) in a thread; the dict gets its outcome ("data" or "errno") and
    "seconds"."""
    out: dict[str, Any] = {}

    def run() -> None:
        t0 = time.monotonic()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                chunks = []
                buf = mmap.mmap(-1, 1 << 20)
                while n := os.readv(fd, [buf]):
                    chunks.append(buf[:n])
                out["data"] = b"".join(chunks)
            finally:
                os.close(fd)
        except OSError as e:
            out["errno"] = e.errno
        out["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    out["thread"] = t
    return out


def _wait_for(cond: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _content(layout_layer, path: str) -> bytes:
    from stargz.estargz import open_file

    with open_file(str(layout_layer.path)) as r:
        node = r.lookup(path)
        return r.read(node.id, 0, node.entry.size)


def _files(lay, n: int) -> list[str]:
    """``n`` regular files of the layer with content, biggest first."""
    regs = [x for x in lay.reader.nodes if x.entry.type == "reg" and x.size > 0]
    regs.sort(key=lambda x: -x.size)
    return [x.path for x in regs[:n]]


# --- closing a layer under waiting reads -------------------------------------------------


def test_unmount_answers_reads_waiting_on_a_stalled_fetch(fs_env, corners):
    gate = Gate()
    fs = fs_env.start(GatedSource(lambda ref, d: gate, layouts=[corners.root]))
    layer = corners.layers("esgz")[0]
    mp = fs_env.mount(layer)
    lay = fs.layer(layer.digest)
    paths = _files(lay, 4)
    gate.stalled = True
    reads = [_read_in_thread(mp / p) for p in paths]
    _wait_for(lambda: gate.waiting >= 1, "the reads to reach the source")
    t0 = time.monotonic()
    fs_env.run(fs.unmount(str(mp)))
    for r in reads:
        r["thread"].join(10)
        assert not r["thread"].is_alive(), "a read was never answered"
        assert r.get("errno") == errno.EIO, r
    assert time.monotonic() - t0 < 10


def test_unmount_answers_a_read_waiting_on_a_cache_rehash_refetch(fs_env, corners):
    """A chunk file found on disk at start is re-hashed before use; when it is damaged the
    chunk is fetched again. Unmounting while that refetch stalls must answer the read."""
    layer = corners.layers("esgz")[0]
    fs = fs_env.start(LocalLayerSource(layouts=[corners.root]))
    mp = fs_env.mount(layer)
    path = "data/text.txt"
    assert (mp / path).read_bytes() == _content(layer, path)
    lay = fs.layer(layer.digest)
    node = lay.reader.lookup(path).id
    lo, hi = lay.chunks.span(node)
    keys = [lay.index.keys[r] for r in range(lo, hi)]
    _wait_for(lambda: all(k in fs.disk for k in keys), "the chunks to reach the disk cache")
    chunk_file = fs.disk.path(keys[0])

    gate = Gate()
    fs = fs_env.start(GatedSource(lambda ref, d: gate, layouts=[corners.root]))  # a restart
    # same size, other bytes: found at start, fails its re-hash
    with open(chunk_file, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    mp = fs_env.mount(layer)
    assert not fs.disk.is_verified(keys[0])
    gate.stalled = True
    r = _read_in_thread(mp / path)
    _wait_for(lambda: gate.waiting >= 1, "the refetch to reach the source")
    fs_env.run(fs.unmount(str(mp)))
    r["thread"].join(10)
    assert not r["thread"].is_alive(), "the read waiting on the re-hash refetch hung"
    assert r.get("errno") == errno.EIO, r


# --- one source's trouble stays its own ----------------------------------------------------


def test_a_stalling_repository_does_not_hold_up_another_ones_reads(fs_env, corners):
    """A hostile image (its own repository) lists the same layer, and a layer with the same
    chunk digests, behind a registry that stalls: other images' reads of those chunks
    neither wait for it nor read through it."""
    evil = Gate()

    def pick(ref: str, digest: str) -> Gate | None:
        return evil if ref.startswith("evil.test/") else None

    source = GatedSource(pick, layouts=[corners.root])
    fs = fs_env.start(source)
    esgz, zstd = corners.layers("esgz")[0], corners.layers("zstdchunked")[0]
    bad = fs_env.mount(esgz, **{STARGZ_REFERENCE_LABEL: "evil.test/base:1"})
    evil.stalled = True
    path = "data/text.txt"
    want = _content(esgz, path)
    stuck = _read_in_thread(bad / path)
    _wait_for(lambda: evil.waiting >= 1, "the hostile image's read to stall")

    same_digest = fs_env.mount(esgz)  # the same layer digest, from another repository
    same_chunks = fs_env.mount(zstd)  # another layer whose chunks have the same digests
    assert fs.layer(str(same_digest)) is not fs.layer(str(bad))
    for mp in (same_digest, same_chunks):
        r = _read_in_thread(mp / path)
        r["thread"].join(5)
        assert not r["thread"].is_alive(), f"a read of {mp} waited for the stalled registry"
        assert r.get("data") == want, r
        assert r["seconds"] < 5
    assert stuck["thread"].is_alive()  # (still stalled: nothing above came through it)
    evil.stalled = False
    stuck["thread"].join(10)
    assert stuck.get("data") == want


def test_a_read_whose_shared_fetch_failed_retries_with_its_own_blob(fs_env, corners):
    """Two layers of one repository share chunks; one layer's blob fails. A read of the
    other layer that waited on the failed fetch fetches again through its own blob."""
    esgz, zstd = corners.layers("esgz")[0], corners.layers("zstdchunked")[0]
    gate = Gate()
    source = GatedSource(lambda ref, d: gate if d == esgz.digest else None, layouts=[corners.root])
    fs = fs_env.start(source)
    bad, good = fs_env.mount(esgz), fs_env.mount(zstd)
    path = "data/text.txt"
    want = _content(esgz, path)
    gate.stalled = True
    first = _read_in_thread(bad / path)
    _wait_for(lambda: gate.waiting >= 1, "the first read to stall")
    lay = fs.layer(str(good))
    key = lay.index.keys[lay.chunks.span(lay.reader.lookup(path).id)[0]]
    assert key in lay.fetcher.inflight  # the other layer's fetch of the same chunk
    second = _read_in_thread(good / path)
    time.sleep(0.2)
    assert second["thread"].is_alive()  # waiting on the shared fetch
    gate.fail = True
    gate.stalled = False
    second["thread"].join(10)
    first["thread"].join(10)
    assert first.get("errno") == errno.EIO, first
    assert second.get("data") == want, second


def test_unverified_chunks_are_not_shared_across_repositories(fs_env, corners):
    """Without a TOC digest nothing vouches for a chunk but its source: the same layer
    digest mounted from two repositories reads each one's chunks through its own blob."""
    source = LocalLayerSource(layouts=[corners.root])
    fs = fs_env.start(source, disable_verification=True)
    layer = corners.layers("esgz")[0]
    a = fs_env.mount(layer, toc=False, **{STARGZ_REFERENCE_LABEL: "one.test/img:1"})
    b = fs_env.mount(layer, toc=False, **{STARGZ_REFERENCE_LABEL: "two.test/img:1"})
    la, lb = fs.layer(str(a)), fs.layer(str(b))
    assert la is not lb
    assert la.index.keys[0] != lb.index.keys[0]
    path = "data/text.txt"
    want = _content(layer, path)
    before = source.bytes_read
    assert (a / path).read_bytes() == want
    first = source.bytes_read - before
    before = source.bytes_read
    assert (b / path).read_bytes() == want
    assert source.bytes_read - before >= first // 2 > 0  # fetched again, not shared
