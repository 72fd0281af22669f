"""Head start: the prefetch range downloads while the TOC is parsed (stargz.fs.headstart)."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from stargz.estargz import reader as reader_mod
from stargz.estargz.reader import Reader
from stargz.fs import LocalLayerSource
from stargz.fs.headstart import HeadStartBlob, landmark_offset
from stargz.fs.layer import Layer


def _toc_json(layout, layer) -> bytes:
    data = layout.blob_path(layer.digest).read_bytes()
    got: list[bytes] = []
    r = Reader(
        lambda off, n: data[off : off + n], len(data), on_toc_json=got.append, keep_toc=False
    )
    return got[0], r


# --- the landmark offset, read from raw JSON -----------------------------------------------


def test_landmark_offset_of_go_optimized_layer(busybox):
    layer = busybox.layers("opt")[0]
    toc_json, r = _toc_json(busybox, layer)
    assert r.prefetch_size and landmark_offset(toc_json) == r.prefetch_size


def test_no_landmark_no_offset(busybox, corners):
    # unoptimized layers carry .no.prefetch.landmark: nothing to start
    for layout in (busybox, corners):
        toc_json, r = _toc_json(layout, layout.layers("esgz")[0])
        assert r.prefetch_size == 0 and landmark_offset(toc_json) is None


def _doc(*entries: dict, indent: str | None = "\t") -> bytes:
    return json.dumps({"version": 1, "entries": list(entries)}, indent=indent).encode()


LM = {"name": ".prefetch.landmark", "type": "reg", "size": 1, "offset": 4096}


@pytest.mark.parametrize("indent", ["\t", None])
def test_landmark_offset_shapes(indent):
    a = {"name": "a", "type": "reg", "size": 3, "offset": 0}
    assert landmark_offset(_doc(a, indent=indent)) is None
    assert landmark_offset(_doc(a, LM, indent=indent)) == 4096
    # key order does not matter; "offset" of a neighbour is not taken
    lm2 = {"offset": 77, "type": "reg", "name": ".prefetch.landmark"}
    assert landmark_offset(_doc(a, lm2, {"name": "b", "offset": 9}, indent=indent)) == 77


@pytest.mark.parametrize(
    "entries",
    [
        # two entries claim the name: no guess
        [LM, dict(LM, offset=1)],
        # a nested object inside the entry
        [dict(LM, xattrs={"user.a": "eA=="})],
        # no offset, or a non-integer one
        [{"name": ".prefetch.landmark", "type": "reg"}],
        [dict(LM, offset="4096")],
        # the name only as a link target
        [{"name": "x", "type": "hardlink", "linkName": ".prefetch.landmark", "offset": 5}],
    ],
)
def test_landmark_offset_refuses_to_guess(entries):
    assert landmark_offset(_doc(*entries)) is None


# --- the blob wrapper ----------------------------------------------------------------------


class CountingBlob:
    """A blob over bytes (the real FileBlob does the same with a file) whose first
    ``fail`` reads raise, as a registry that drops the connection would."""

    def __init__(self, data: bytes, fail: int = 0) -> None:
        self.data = data
        self.fail = fail
        self.requests: list[tuple[int, int]] = []
        self.inflight = self.max_inflight = 0

    @property
    def size(self) -> int:
        return len(self.data)

    async def read_ranges(self, ranges):
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            await asyncio.sleep(0.001)
        finally:
            self.inflight -= 1
        self.requests.extend(ranges)
        if self.fail:
            self.fail -= 1
            raise ConnectionResetError("dropped")
        return [self.data[o : o + n] for o, n in ranges]


DATA = bytes(range(256)) * 40  # 10240 bytes


def test_head_pieces_answer_reads_inside_the_head():
    async def go():
        blob = CountingBlob(DATA)
        hs = HeadStartBlob(blob, 5000, 1024)
        got = await hs.read_ranges([(0, 100), (1000, 2000), (4990, 10), (6000, 50)])
        assert got == [DATA[0:100], DATA[1000:3000], DATA[4990:5000], DATA[6000:6050]]
        await asyncio.sleep(0.01)
        # the head went as 5 sequential pieces; only the range past it went on its own
        assert blob.requests == [
            (0, 1024),
            (1024, 1024),
            (2048, 1024),
            (3072, 1024),
            (4096, 904),
            (6000, 50),
        ]
        assert hs.fetched == 5000
        hs.release()
        n = len(blob.requests)
        assert await hs.read_ranges([(0, 10)]) == [DATA[:10]]
        assert len(blob.requests) == n + 1  # released: straight to the blob

    asyncio.run(go())


def test_range_across_the_head_end_takes_only_the_rest_from_the_blob():
    async def go():
        blob = CountingBlob(DATA)
        hs = HeadStartBlob(blob, 5000, 1024)
        assert await hs.read_ranges([(4000, 2000)]) == [DATA[4000:6000]]
        assert blob.requests[-1] == (5000, 1000)  # not the head's bytes again
        hs.release()

    asyncio.run(go())


@pytest.mark.parametrize("parallel", [1, 3, 8])
def test_parallel_workers_fetch_every_piece_once(parallel):
    async def go():
        blob = CountingBlob(DATA)
        hs = HeadStartBlob(blob, len(DATA), 1000, parallel)
        assert await hs.read_ranges([(0, len(DATA))]) == [DATA]
        assert sorted(blob.requests) == [
            (o, min(1000, len(DATA) - o)) for o in range(0, 10240, 1000)
        ]
        assert blob.max_inflight == parallel
        hs.release()

    asyncio.run(go())


def test_failed_head_falls_back_to_the_blob():
    async def go():
        blob = CountingBlob(DATA, fail=1)  # the first piece's request fails
        hs = HeadStartBlob(blob, 4096, 1024)
        assert await hs.read_ranges([(10, 3000)]) == [DATA[10:3010]]
        assert (10, 3000) in blob.requests
        await hs.close()

    asyncio.run(go())


def test_release_while_waiting_reads_from_the_blob():
    async def go():
        gate = asyncio.Event()

        class Slow(CountingBlob):
            async def read_ranges(self, ranges):
                if ranges[0][0] == 0 and not gate.is_set():
                    await gate.wait()
                return await super().read_ranges(ranges)

        blob = Slow(DATA)
        hs = HeadStartBlob(blob, 2048, 1024)
        reader = asyncio.ensure_future(hs.read_ranges([(0, 10)]))
        await asyncio.sleep(0.01)
        hs.release()
        gate.set()
        assert await asyncio.wait_for(reader, 5) == [DATA[:10]]

    asyncio.run(go())


class StreamingBlob(CountingBlob):
    """A blob that also streams one long read piece by piece (the registry reader's
    `read_at_streaming`), pausing between pieces; ``fail_at`` drops it at that offset."""

    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        super().__init__(data)
        self.fail_at = fail_at
        self.streams: list[tuple[int, int]] = []

    async def read_at_streaming(self, off, n, piece, on_piece):
        self.streams.append((off, n))
        for pos in range(0, n, piece):
            await asyncio.sleep(0.01)
            if self.fail_at is not None and pos >= self.fail_at:
                raise ConnectionResetError("dropped mid-stream")
            on_piece(pos, self.data[off + pos : off + min(pos + piece, n)])
        return self.data[off : off + n]


def test_one_flow_head_is_one_request_whose_pieces_serve_reads_as_they_arrive():
    async def go():
        blob = StreamingBlob(DATA)
        hs = HeadStartBlob(blob, 5000, 1024)  # one flow (parallel 1)
        first = await hs.read_ranges([(0, 100)])
        assert first == [DATA[:100]]
        # the first piece answered while the stream was still under way
        assert not hs._tasks[0].done()
        assert await hs.read_ranges([(4000, 1000)]) == [DATA[4000:5000]]
        assert blob.streams == [(0, 5000)] and blob.requests == []
        assert hs.fetched == 5000
        hs.release()

    asyncio.run(go())


def test_head_in_several_streams_of_consecutive_pieces():
    async def go():
        blob = StreamingBlob(DATA)
        hs = HeadStartBlob(blob, 5000, 1024, streams=3)  # 5 pieces: 1 + 2 + 2
        got = await hs.read_ranges([(0, 100), (2000, 100), (4500, 500)])
        assert got == [DATA[:100], DATA[2000:2100], DATA[4500:5000]]
        assert sorted(blob.streams) == [(0, 1024), (1024, 2048), (3072, 1928)]
        assert blob.requests == [] and hs.fetched == 5000
        assert hs.has(0, 5000) and not hs.has(4000, 1001)
        # a stream dropped mid-way fails only its own pieces: those go to the blob
        blob2 = StreamingBlob(DATA, fail_at=1024)
        hs2 = HeadStartBlob(blob2, 4096, 1024, streams=2)
        got = await hs2.read_ranges([(0, 1024), (1500, 100), (2048, 1024), (3500, 100)])
        assert got == [DATA[:1024], DATA[1500:1600], DATA[2048:3072], DATA[3500:3600]]
        assert (1500, 100) in blob2.requests and (3500, 100) in blob2.requests
        hs.release()
        await hs2.close()

    asyncio.run(go())


def test_one_flow_head_dropped_mid_stream_falls_back_to_the_blob():
    async def go():
        blob = StreamingBlob(DATA, fail_at=2048)
        hs = HeadStartBlob(blob, 5000, 1024)
        assert await hs.read_ranges([(0, 1024)]) == [DATA[:1024]]  # arrived before the drop
        assert await hs.read_ranges([(3000, 1500)]) == [DATA[3000:4500]]
        assert (3000, 1500) in blob.requests  # from the blob itself
        await hs.close()

    asyncio.run(go())


# --- in the daemon's layer open --------------------------------------------------------------


def test_prefetch_download_starts_before_the_parse_ends(fs_env, busybox, monkeypatch):
    """The parse is held up on purpose; the head's first request must be in the source's
    log by then. Without the head start the prefetch only asks after the parse."""
    layer = busybox.layers("opt")[0]
    source = LocalLayerSource(layouts=[busybox.root])
    seen: list[list] = []
    parsed = threading.Event()
    build = reader_mod.tocbuild.build_json

    def slow_build(*a, **kw):
        threading.Event().wait(0.3)
        seen.append(list(source.log))
        parsed.set()
        return build(*a, **kw)

    monkeypatch.setattr(reader_mod.tocbuild, "build_json", slow_build)
    fs = fs_env.start(source)
    mp = fs_env.mount(layer)
    assert parsed.is_set()
    lay = fs.layer(layer.digest)
    assert isinstance(lay.blob, HeadStartBlob)
    head_requests = [r for _, ranges in seen[0] for r in ranges if r[0] == 0]
    assert head_requests, seen[0]
    fs_env.run(asyncio.wait_for(lay.prefetch_done.wait(), 30))
    assert lay.blob._pieces is None  # released
    # the head's bytes were fetched once: no range below the landmark twice
    below = [r for _, ranges in source.log for r in ranges if r[0] < lay.prefetch_size]
    assert len(below) == len(set(below))
    assert sum(n for o, n in below) <= lay.prefetch_size + (64 << 10)
    assert (mp / "bin/busybox").read_bytes()
    assert lay.metrics.on_demand_fetches == 0


def test_no_head_start_for_a_cached_toc_or_noprefetch(fs_env, busybox):
    layer = busybox.layers("opt")[0]
    source = LocalLayerSource(layouts=[busybox.root])
    fs = fs_env.start(source, noprefetch=True)
    fs_env.mount(layer)
    assert not isinstance(fs.layer(layer.digest).blob, HeadStartBlob)
    # a restart finds the TOC (and chunks) in the disk cache: nothing to start
    fs = fs_env.start(source)
    fs_env.mount(layer)
    assert not isinstance(fs.layer(layer.digest).blob, HeadStartBlob)


def test_layer_open_failure_stops_the_head(busybox, tmp_path, monkeypatch):
    """A TOC the builder rejects fails the open after the head started: the head
    download must not outlive it."""
    layer = busybox.layers("opt")[0]
    from stargz.errors import TOCError

    def bad_build(*a, **kw):
        raise TOCError("rejected on purpose")

    monkeypatch.setattr(reader_mod.tocbuild, "build_json", bad_build)

    async def go():
        from concurrent.futures import ThreadPoolExecutor

        from stargz.fs.cache import DiskCache, MemoryLRU
        from stargz.fs.options import FsOptions
        from stargz.fs.scheduler import Scheduler

        source = LocalLayerSource(layouts=[busybox.root])
        blob = await source.resolve("x", layer.digest, {})
        disk = DiskCache(str(tmp_path))
        disk.load()
        started = []
        real_init = HeadStartBlob.__init__

        def init(self, *a, **kw):
            started.append(self)
            real_init(self, *a, **kw)

        monkeypatch.setattr(HeadStartBlob, "__init__", init)
        with ThreadPoolExecutor(2) as ex, pytest.raises(TOCError):
            await Layer.open(
                layer.digest,
                blob,
                toc_digest=layer.toc_digest,
                verify=True,
                options=FsOptions(),
                memory=MemoryLRU(1 << 20),
                disk=disk,
                executor=ex,
                scheduler=Scheduler(2, 0.1, 0.1),
            )
        assert started and started[0]._pieces is None  # it started, and was released
        await asyncio.sleep(0.05)
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not pending

    asyncio.run(go())


# --- the landmark from a TOC's first bytes -------------------------------------------------


def _toc_region(layout, layer) -> bytes:
    from stargz.estargz.footer import parse_footer

    data = layout.blob_path(layer.digest).read_bytes()
    return data[parse_footer(data[-64:], len(data)).toc_offset :]


def test_landmark_from_the_first_bytes_of_a_toc(busybox, corners):
    from stargz.fs.headstart import TOC_HEAD_BYTES, landmark_from_toc_head

    layer = busybox.layers("opt")[0]
    _, r = _toc_json(busybox, layer)
    region = _toc_region(busybox, layer)
    assert r.prefetch_size and landmark_from_toc_head(region[:TOC_HEAD_BYTES]) == r.prefetch_size
    # too few bytes to hold the landmark's entry: no guess
    assert landmark_from_toc_head(region[:64]) is None
    # unoptimized: nothing; not gzip (zstd:chunked) or damaged: nothing
    for layout in (busybox, corners):
        assert landmark_from_toc_head(_toc_region(layout, layout.layers("esgz")[0])) is None
    zst = _toc_region(corners, corners.layers("zstdchunked")[0])
    assert landmark_from_toc_head(zst[:TOC_HEAD_BYTES]) is None
    assert landmark_from_toc_head(region[:10] + b"\xff" * 4000) is None


def test_head_start_begins_with_the_toc_head_before_the_rest_arrives(
    busybox, tmp_path, monkeypatch
):
    """A TOC region longer than the first tail read: the prefetch download is asked for
    as soon as the TOC's first bytes are in, while the rest of the TOC is still held up."""
    from concurrent.futures import ThreadPoolExecutor

    import stargz.fs.layer_open as lo
    from stargz.fs.cache import DiskCache
    from stargz.fs.headstart import TOC_HEAD_BYTES

    layer = busybox.layers("opt")[0]
    _, r = _toc_json(busybox, layer)
    data = busybox.blob_path(layer.digest).read_bytes()

    class StreamingBlob(CountingBlob):
        """Sends the head of a long read, then waits until told to send the rest."""

        def __init__(self, data: bytes) -> None:
            super().__init__(data)
            self.asked_while_waiting: list[tuple[int, int]] = []

        async def read_at_with_head(self, off, n, head, on_head):
            on_head(self.data[off : off + head])
            await asyncio.sleep(0.05)
            self.asked_while_waiting = list(self.requests)
            return (await self.read_ranges([(off, n)]))[0]

    async def go():
        blob = StreamingBlob(data)
        disk = DiskCache(str(tmp_path))
        disk.load()
        head = lo._HeadStart(blob, 64 << 20, asyncio.get_running_loop())
        toc_offset = len(data) - len(_toc_region(busybox, layer))
        # a first tail read that ends after the TOC's start forces the long read
        monkeypatch.setattr(lo, "TAIL_FETCH_SIZE", max(64, len(data) - toc_offset - TOC_HEAD_BYTES))
        with ThreadPoolExecutor(1) as ex:
            start, got, _ = await lo.fetch_tail(blob, layer.digest, disk, ex, 0, head.on_toc_head)
        assert start == toc_offset and got == data[toc_offset:]
        assert head.blob is not None and head.blob.head_size == r.prefetch_size
        # the head's first piece was requested while the TOC's rest was held up
        assert any(o == 0 for o, _ in blob.asked_while_waiting), blob.asked_while_waiting
        head.cancel()

    asyncio.run(go())
