"""Neighbour layers: a mount pre-resolves the other layers its labels name
(`stargz.fs.neighbours`), and their own mounts reuse what was fetched.

Real FUSE mounts over eStargz layers made by our writer, served from local files by
`LocalLayerSource`, whose request log is the record of what was read from the blobs.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from harness.oci import tar_layer

from stargz.estargz.writer import build
from stargz.fs import LocalLayerSource
from stargz.fs.source import CRI_IMAGE_LAYERS_LABEL, STARGZ_LAYERS_LABEL

from .conftest import FsEnv, labels_for

N_LAYERS = 6
MISSING = "sha256:" + "0" * 64


def make_layers(base: Path, n: int = N_LAYERS, prioritized: int = 0) -> list[SimpleNamespace]:
    """``n`` eStargz layers (our writer), each with its own files; the first
    ``prioritized`` of them before a ``.prefetch.landmark``."""
    base.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        files = {
            f"l{i}/f{j:03d}.txt": f"layer {i} file {j}\n".encode() * (j + 1) for j in range(40)
        }
        dst = io.BytesIO()
        first = sorted(files)[:prioritized] or None
        res = build(io.BytesIO(tar_layer(files)), dst, prioritized_files=first)
        path = base / res.blob_digest.split(":")[1]
        path.write_bytes(dst.getvalue())
        out.append(SimpleNamespace(digest=res.blob_digest, toc_digest=res.toc_digest, files=files))
    return out


def labels(layers: list[SimpleNamespace], i: int, *, cri: bool = False, extra: str = "") -> dict:
    """What ctr-remote (or CRI) passes for layer ``i``: this and the following digests."""
    key = CRI_IMAGE_LAYERS_LABEL if cri else STARGZ_LAYERS_LABEL
    names = [x.digest for x in layers[i:]] + ([extra] if extra else [])
    return labels_for(layers[i], cri=cri, **{key: ",".join(names)})


def requests_of(source: LocalLayerSource, digest: str) -> int:
    return sum(1 for d, _ in source.log if d == digest)


def wait_until(env: FsEnv, cond: Any, timeout: float = 10) -> None:
    async def poll() -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.01)

    env.run(poll(), timeout + 5)


def neighbours_settled(env: FsEnv) -> bool:
    """No neighbour fetch is still running."""
    assert env.fs is not None
    return all(e.task is None or e.task.done() for e in env.fs.neighbours._entries.values())


def check_files(mp: Path, layer: SimpleNamespace) -> None:
    for name, data in layer.files.items():
        assert hashlib.sha256((mp / name).read_bytes()).digest() == hashlib.sha256(data).digest()


def source_for(layers: list[SimpleNamespace], base: Path, latency: float = 0.0) -> LocalLayerSource:
    return LocalLayerSource(
        blobs={x.digest: base / x.digest.split(":")[1] for x in layers}, latency=latency
    )


def test_neighbour_tocs_are_fetched_once_and_reused(fs_env: FsEnv) -> None:
    layers = make_layers(fs_env.base / "blobs")
    src = source_for(layers, fs_env.base / "blobs")
    fs = fs_env.start(src, noprefetch=True)
    mps = []
    mp0 = fs_env.mountpoint()
    fs_env.run(fs.mount(str(mp0), labels(layers, 0)))
    mps.append(mp0)
    wait_until(fs_env, lambda: neighbours_settled(fs_env))
    # every other layer: resolved and its TOC read, once, before anyone mounted it
    assert src.resolves == N_LAYERS
    assert [requests_of(src, x.digest) for x in layers] == [1] * N_LAYERS
    assert fs.metrics.neighbour_fetches == N_LAYERS - 1
    assert fs.neighbours.held_bytes > 0
    for i in range(1, N_LAYERS):
        mp = fs_env.mountpoint()
        fs_env.run(fs.mount(str(mp), labels(layers, i)))
        mps.append(mp)
    # the mounts took what was there: no resolve and no read more
    assert src.resolves == N_LAYERS
    assert [requests_of(src, x.digest) for x in layers] == [1] * N_LAYERS
    assert fs.metrics.neighbour_hits == N_LAYERS - 1
    assert len(fs.neighbours) == 0 and fs.neighbours.held_bytes == 0
    for mp, layer in zip(mps, layers, strict=True):
        check_files(mp, layer)


def test_cri_label_names_the_neighbours_too(fs_env: FsEnv) -> None:
    layers = make_layers(fs_env.base / "blobs", 3)
    src = source_for(layers, fs_env.base / "blobs")
    fs = fs_env.start(src, noprefetch=True)
    fs_env.run(fs.mount(str(fs_env.mountpoint()), labels(layers, 0, cri=True)))
    wait_until(fs_env, lambda: neighbours_settled(fs_env))
    assert fs.metrics.neighbour_fetches == 2 and len(fs.neighbours) == 2


def test_a_mount_waits_for_the_fetch_under_way(fs_env: FsEnv) -> None:
    layers = make_layers(fs_env.base / "blobs", 3)
    src = source_for(layers, fs_env.base / "blobs", latency=0.5)
    fs = fs_env.start(src, noprefetch=True)

    async def both() -> None:
        first = asyncio.ensure_future(fs.mount(str(fs_env.mountpoint()), labels(layers, 0)))
        await asyncio.sleep(0.1)  # the neighbour fetches are reading (0.5 s each)
        assert not neighbours_settled(fs_env)
        mp = fs_env.mountpoint()
        await fs.mount(str(mp), labels(layers, 1))
        await first

    fs_env.run(both())
    assert requests_of(src, layers[1].digest) == 1
    assert fs.metrics.neighbour_hits == 1


def test_a_missing_neighbour_is_logged_and_harmless(fs_env: FsEnv, caplog: Any) -> None:
    layers = make_layers(fs_env.base / "blobs", 2)
    src = source_for(layers, fs_env.base / "blobs")
    fs = fs_env.start(src, noprefetch=True)
    mp0 = fs_env.mountpoint()
    with caplog.at_level("INFO", logger="stargz.fs"):
        fs_env.run(fs.mount(str(mp0), labels(layers, 0, extra=MISSING + ",not-a-digest")))
        wait_until(fs_env, lambda: neighbours_settled(fs_env))
    assert fs.metrics.neighbour_failures == 1
    msgs = [r.getMessage() for r in caplog.records]
    assert "cannot pre-resolve a neighbour layer; its own mount will try" in msgs
    assert "not pre-resolving a neighbour layer: not a sha256 digest" in msgs
    # remembered: the next mount, whose label names it again, does not ask again
    mp1 = fs_env.mountpoint()
    fs_env.run(fs.mount(str(mp1), labels(layers, 1, extra=MISSING)))
    assert fs.metrics.neighbour_failures == 1 and src.resolves == 3
    check_files(mp0, layers[0])
    check_files(mp1, layers[1])
    assert fs.metrics.neighbour_hits == 1


def test_an_unmounted_neighbour_is_released_after_the_hold_time(fs_env: FsEnv) -> None:
    layers = make_layers(fs_env.base / "blobs", 3)
    src = source_for(layers, fs_env.base / "blobs")
    fs = fs_env.start(src, noprefetch=True, neighbour_hold_sec=0.3)
    fs_env.run(fs.mount(str(fs_env.mountpoint()), labels(layers, 0)))
    wait_until(fs_env, lambda: fs.metrics.neighbour_expired == 2)
    assert len(fs.neighbours) == 0 and fs.neighbours.held_bytes == 0
    # mounted later: fetched again, as if never pre-resolved
    mp = fs_env.mountpoint()
    fs_env.run(fs.mount(str(mp), labels(layers, 1)))
    assert requests_of(src, layers[1].digest) == 2
    check_files(mp, layers[1])


def test_held_tocs_stay_under_the_byte_bound(fs_env: FsEnv) -> None:
    layers = make_layers(fs_env.base / "blobs", 4)
    src = source_for(layers, fs_env.base / "blobs")
    # one TOC region fits, two do not (the layers are alike)
    probe = fs_env.start(src, noprefetch=True)
    fs_env.run(probe.mount(str(fs_env.mountpoint()), labels(layers, 0)))
    wait_until(fs_env, lambda: neighbours_settled(fs_env))
    one = max(e.result.data.__len__() for e in probe.neighbours._entries.values())
    fs = fs_env.start(src, noprefetch=True, resolve_neighbours_max_bytes=one + one // 2)
    fs_env.run(fs.mount(str(fs_env.mountpoint()), labels(layers, 0)))
    wait_until(fs_env, lambda: neighbours_settled(fs_env) and fs.metrics.neighbour_dropped >= 1)
    assert len(fs.neighbours) == 1 and 0 < fs.neighbours.held_bytes <= one + one // 2
    assert fs.metrics.neighbour_dropped == 2
    for i in range(1, 4):
        mp = fs_env.mountpoint()
        fs_env.run(fs.mount(str(mp), labels(layers, i)))
        check_files(mp, layers[i])


def test_a_toc_bigger_than_the_bound_is_not_fetched_ahead(fs_env: FsEnv) -> None:
    layers = make_layers(fs_env.base / "blobs", 2)
    src = source_for(layers, fs_env.base / "blobs")
    fs = fs_env.start(src, noprefetch=True, resolve_neighbours_max_bytes=100)
    fs_env.run(fs.mount(str(fs_env.mountpoint()), labels(layers, 0)))
    wait_until(fs_env, lambda: neighbours_settled(fs_env))
    # refused after the first tail read: the rest of the TOC region was never asked for
    assert fs.metrics.neighbour_failures == 1 and fs.neighbours.held_bytes == 0
    mp = fs_env.mountpoint()
    fs_env.run(fs.mount(str(mp), labels(layers, 1)))
    check_files(mp, layers[1])


def test_off_fetches_nothing_ahead(fs_env: FsEnv) -> None:
    layers = make_layers(fs_env.base / "blobs", 3)
    src = source_for(layers, fs_env.base / "blobs")
    fs = fs_env.start(src, noprefetch=True, resolve_neighbours=False)
    fs_env.run(fs.mount(str(fs_env.mountpoint()), labels(layers, 0)))
    fs_env.run(asyncio.sleep(0.3))
    assert src.resolves == 1 and [requests_of(src, x.digest) for x in layers] == [1, 0, 0]
    assert fs.metrics.neighbour_fetches == 0 and len(fs.neighbours) == 0


class SlowResolves(LocalLayerSource):
    """Resolving any layer but ``fast`` takes ``delay`` seconds (a registry slow to answer)."""

    def __init__(self, fast: str, delay: float, **kw: Any) -> None:
        super().__init__(**kw)
        self.fast, self.delay = fast, delay

    async def resolve(self, ref: str, digest: str, labels: Any) -> Any:
        if digest != self.fast:
            await asyncio.sleep(self.delay)
        return await super().resolve(ref, digest, labels)


def test_close_cancels_the_fetches_under_way(fs_env: FsEnv) -> None:
    layers = make_layers(fs_env.base / "blobs", 3)
    blobs = {x.digest: fs_env.base / "blobs" / x.digest.split(":")[1] for x in layers}
    src = SlowResolves(layers[0].digest, 60.0, blobs=blobs)
    fs = fs_env.start(src, noprefetch=True)
    fs_env.run(fs.mount(str(fs_env.mountpoint()), labels(layers, 0)))
    tasks = [e.task for e in fs.neighbours._entries.values()]
    assert len(tasks) == 2 and not any(t.done() for t in tasks)
    t0 = time.monotonic()
    fs_env.close_fs()
    assert time.monotonic() - t0 < 10
    assert all(t.cancelled() for t in tasks)
    assert len(fs.neighbours) == 0


def below(source: LocalLayerSource, digest: str, offset: int) -> list[tuple[int, int]]:
    """The ranges read from ``digest`` that start below ``offset``, but the tail reads
    (these small blobs' footer + TOC reads start at 0 too)."""
    size = os.path.getsize(source.path_of(digest))
    return [
        r
        for d, ranges in source.log
        if d == digest
        for r in ranges
        if r[0] < offset and r[0] + r[1] < size
    ]


def test_a_neighbours_prefetch_starts_downloading_with_its_toc(fs_env: FsEnv) -> None:
    """Layers with a landmark: each neighbour's prefetch range starts downloading once its
    TOC is in (before anyone mounts it), counts against the byte bound while held, and
    its own mount's prefetch takes those bytes instead of asking again."""
    from stargz.fs.headstart import HeadStartBlob

    layers = make_layers(fs_env.base / "blobs", 3, prioritized=10)
    src = source_for(layers, fs_env.base / "blobs")
    fs = fs_env.start(src)
    fs_env.run(fs.mount(str(fs_env.mountpoint()), labels(layers, 0)))
    wait_until(fs_env, lambda: neighbours_settled(fs_env))
    held = {e.key[1]: e.result for e in fs.neighbours._entries.values()}
    for x in layers[1:]:
        got = held[x.digest]
        assert isinstance(got.blob, HeadStartBlob) and got.head_bytes > 0
        wait_until(fs_env, lambda d=x.digest, n=got.head_bytes: below(src, d, n) != [])
    assert fs.neighbours.held_bytes == sum(g.held for g in held.values())
    for i in (1, 2):
        mp = fs_env.mountpoint()
        fs_env.run(fs.mount(str(mp), labels(layers, i)))
        lay = fs.layer(layers[i].digest)
        assert lay.blob is held[layers[i].digest].blob  # no second head start
        fs_env.run(asyncio.wait_for(lay.prefetch_done.wait(), 30))
        assert lay.prefetch_size == held[layers[i].digest].head_bytes
        # the prefetch range was read once, by the head start
        assert below(src, layers[i].digest, lay.prefetch_size) == [(0, lay.prefetch_size)]
        check_files(mp, layers[i])
    assert fs.neighbours.held_bytes == 0


def test_a_neighbour_head_start_nobody_mounts_is_released(fs_env: FsEnv) -> None:
    layers = make_layers(fs_env.base / "blobs", 2, prioritized=10)
    src = source_for(layers, fs_env.base / "blobs")
    fs = fs_env.start(src, neighbour_hold_sec=0.3)
    fs_env.run(fs.mount(str(fs_env.mountpoint()), labels(layers, 0)))
    wait_until(fs_env, lambda: neighbours_settled(fs_env))
    (entry,) = fs.neighbours._entries.values()
    head = entry.result.blob
    wait_until(fs_env, lambda: fs.metrics.neighbour_expired == 1)
    assert head._pieces is None  # released, its download stopped
    assert fs.neighbours.held_bytes == 0
