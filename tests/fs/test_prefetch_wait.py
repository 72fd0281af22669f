"""A container starts while its layers' prefetch streams in (``wait_prefetch_on_check``
off), and a read never waits behind prefetch pieces queued ahead of its chunk: it fetches
the chunk's member itself (``Fetcher.overtake``)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence

import pytest

from stargz.estargz import open_file
from stargz.fs import LocalLayerSource


class _HeldBlob:
    """A blob whose reads of its first byte onwards (the prefetch range) wait for
    ``release``, as a slow registry would hold them; every other read is answered."""

    def __init__(self, blob, release: threading.Event, held: list) -> None:
        self._blob, self._release, self._held = blob, release, held

    @property
    def size(self) -> int:
        return self._blob.size

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        if any(off == 0 for off, _ in ranges):
            self._held.append(list(ranges))
            while not self._release.is_set():
                await asyncio.sleep(0.005)
        return await self._blob.read_ranges(ranges)

    async def check(self) -> None:
        await self._blob.check()

    def close(self) -> None:
        self._blob.close()


class HeldPrefetchSource(LocalLayerSource):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.release = threading.Event()
        self.held: list = []

    async def resolve(self, ref: str, digest: str, labels: Mapping[str, str]):
        return _HeldBlob(await super().resolve(ref, digest, labels), self.release, self.held)


def _read_in_thread(path) -> tuple[threading.Thread, list[bytes]]:
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(path.read_bytes()), daemon=True)
    t.start()
    return t, got


def _content(layer, path: str) -> bytes:
    with open_file(str(layer.path)) as r:
        node = r.lookup(path)
        return r.read(node.id, 0, node.entry.size)


@pytest.mark.parametrize("wait", [False, True])
def test_check_waits_for_the_prefetch_only_when_configured(fs_env, busybox, wait):
    layer = busybox.layers("opt")[0]
    source = HeldPrefetchSource(layouts=[busybox.root])
    fs = fs_env.start(
        source, wait_prefetch_on_check=wait, prefetch_timeout_sec=60, passthrough=False
    )
    mp = fs_env.mount(layer)
    lay = fs.layer(layer.digest)
    assert lay.prefetch_size > 0
    if wait:  # Go's behaviour: containerd's create waits until the prefetch is in
        threading.Timer(0.3, source.release.set).start()
        fs_env.run(fs.check(str(mp), {}))
        assert lay.prefetch_done.is_set()
        return
    # answers while the prefetch range is held (a check that waited would time out here)
    fs_env.run(asyncio.wait_for(fs.check(str(mp), {}), 5))
    assert source.held and not source.release.is_set()
    assert not lay.prefetch_done.is_set()
    # a read of a prefetched file waits for its own chunks, which the prefetch brings
    threading.Timer(0.2, source.release.set).start()
    assert (mp / "bin/busybox").read_bytes() == _content(layer, "bin/busybox")
    fs_env.run(asyncio.wait_for(lay.prefetch_done.wait(), 30))
    assert lay.metrics.on_demand_fetches == 0


def test_read_queued_behind_a_held_prefetch_piece_fetches_its_member_itself(fs_env, busybox):
    """busybox's prefetch in 64 KiB pieces: bin/busybox (one big member, its own piece,
    held at the source) then etc/greeting. Reading etc/greeting must not wait for
    bin/busybox; reading bin/busybox (the piece under way) waits for it."""
    layer = busybox.layers("opt")[0]
    source = HeldPrefetchSource(layouts=[busybox.root])
    fs = fs_env.start(source, prefetch_chunk_size=64 << 10, passthrough=False)
    mp = fs_env.mount(layer)
    lay = fs.layer(layer.digest)
    reader, busybox_read = _read_in_thread(mp / "bin/busybox")
    try:
        t, greeting = _read_in_thread(mp / "etc/greeting")
        t.join(10)
        assert greeting == [_content(layer, "etc/greeting")]
        assert not source.release.is_set() and source.held  # (the prefetch is still held)
        assert lay.metrics.overtakes == 1
        reader.join(0.3)
        assert reader.is_alive() and not busybox_read  # its piece is the one under way
    finally:
        source.release.set()
    reader.join(30)
    assert busybox_read == [_content(layer, "bin/busybox")]
    assert lay.metrics.overtakes == 1
    fs_env.run(asyncio.wait_for(lay.prefetch_done.wait(), 30))
    # the prefetch skipped the chunk the read brought: nothing failed, nothing twice
    assert lay.metrics.verification_failures == 0 and lay.metrics.read_errors == 0
    assert (mp / "etc/greeting").read_bytes() == _content(layer, "etc/greeting")


def test_an_overtake_that_fails_leaves_the_chunk_to_the_prefetch(fs_env, busybox):
    """The member fetched ahead fails at the source: the read does not fail, it gets the
    bytes from the prefetch piece it was queued in."""
    layer = busybox.layers("opt")[0]
    source = HeldPrefetchSource(layouts=[busybox.root])
    fs = fs_env.start(source, prefetch_chunk_size=64 << 10, passthrough=False)
    mp = fs_env.mount(layer)
    lay = fs.layer(layer.digest)
    base = lay.fetcher.blob
    base = getattr(base, "blob", base)
    real = base.read_ranges

    async def failing(ranges):
        if not any(off == 0 for off, _ in ranges):
            raise ConnectionResetError("dropped on purpose")
        return await real(ranges)

    base.read_ranges = failing
    t, got = _read_in_thread(mp / "etc/greeting")
    try:
        t.join(0.3)
        assert t.is_alive() and lay.metrics.overtakes == 1  # tried, failed, waits for the piece
    finally:
        source.release.set()
    t.join(30)
    assert got == [_content(layer, "etc/greeting")]
    assert lay.metrics.read_errors == 0
