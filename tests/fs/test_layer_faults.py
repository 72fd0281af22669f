"""Reads while things go wrong around them: a layer closed under waiting reads, a stalling
or failing source shared (or not) with other layers.

The blobs are the real fixture files served by `LocalLayerSource`; `GatedSource` sits in
front of it only to stall or fail a chosen source's range reads, a fault a local file
can't produce.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from stargz.errors import Unavailable
from stargz.fs import LocalLayerSource


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
    """Read ``path`` (O_DIRECT: past the page cache) in a thread; the dict gets its
    outcome ("data" or "errno") and "seconds"."""
    out: dict[str, Any] = {}

    def run() -> None:
        t0 = time.monotonic()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                chunks = []
                while b := os.read(fd, 1 << 20):
                    chunks.append(b)
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
