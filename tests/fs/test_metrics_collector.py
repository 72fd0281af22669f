"""The Prometheus collector over a real filesystem: a layer mounted through FUSE, read, and
scraped; the values must be the filesystem's own counters, under the Go names and labels."""

from __future__ import annotations

import dataclasses
import errno
import os
import time

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stargz.fs import LocalLayerSource
from stargz.service.metrics import make_registry

from .conftest import corrupt_first_chunk


def scrape(fs_env, fs, registry=None, *, digest: str | None = None):
    """{(sample name, labels): value}, rendered on the filesystem's loop as the daemon does.

    With ``digest``, also that layer's own counters and fetched size, taken in the same
    step of the loop (fetches and cache writes finish in the background: a later look
    could see more)."""

    async def render():
        text = generate_latest(registry or make_registry(fs))
        if digest is None:
            return text, None
        layer = fs.layer(digest)
        return text, (dataclasses.replace(layer.metrics), layer.fetched_size())

    text, own = fs_env.run(render())
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text.decode())
        for s in fam.samples
    }
    return samples if digest is None else (samples, *own)


async def _fetched_size(layer) -> int:
    return layer.fetched_size()


def value(samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def series(samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for n, labels in samples if n == name]


def test_a_read_shows_up_under_the_go_names(fs_env, corners, corners_source):
    fs = fs_env.start(corners_source, passthrough=False)  # reads and bytes served by the daemon
    layer = corners.layers("esgz")[0]
    d = layer.digest
    mp = fs_env.mount(layer)
    data = (mp / "data/xattr-file").read_bytes()
    assert data
    s, m, fetched_now = scrape(fs_env, fs, digest=d)

    op = "stargz_fs_operation_count"
    assert value(s, op, operation_type="on_demand_read_access_count", layer=d) == m.reads >= 1
    fetches = value(s, op, operation_type="on_demand_remote_registry_fetch_count", layer=d)
    assert fetches == m.on_demand_fetches == 1
    bs = "stargz_fs_bytes_served"
    served = value(s, bs, operation_type="on_demand_bytes_served", layer=d)
    assert served == m.bytes_served >= len(data)
    on_demand = value(s, bs, operation_type="on_demand_bytes_fetched", layer=d)
    assert on_demand == m.on_demand_bytes_fetched > 0

    where = {"digest": d, "mountpoint": str(mp)}
    assert value(s, "stargz_fs_layer_size_bytes", **where) == layer.size
    fetched = value(s, "stargz_fs_layer_fetched_size_bytes", **where)
    assert fetched == fetched_now and 0 < fetched < layer.size
    # oci-corners has a .no.prefetch.landmark: nothing to prefetch
    assert value(s, "stargz_fs_layer_prefetch_size_bytes", **where) == 0

    kinds = {
        k: value(s, "stargz_fs_layer_fetched_bytes_total", layer=d, kind=k)
        for k in ("open", "on_demand", "prefetch", "background")
    }
    assert kinds["open"] > 0 and kinds["on_demand"] == on_demand
    assert sum(kinds.values()) == m.fetched_bytes
    assert value(s, "stargz_fs_layer_chunk_lookups_total", layer=d, result="miss") == (
        m.cache_misses
    )
    assert value(s, "stargz_fs_layer_verification_failures_total", layer=d) == 0
    for step in ("resolve", "fetch_toc", "parse_toc", "build_tree"):
        assert value(s, "stargz_fs_layer_open_duration_seconds", layer=d, step=step) > 0
    assert value(s, "stargz_fs_mounts_total") == 1
    assert value(s, "stargz_fs_open_layers") == 1
    assert value(s, "stargz_fs_memory_cache_chunks") > 0
    assert value(s, "process_resident_memory_bytes") > 0

    # one registry scraped again after more of the layer is cached: the fetched size
    # follows the disk cache (it is remembered only while the cache does not change)
    registry = make_registry(fs)
    s, _, before = scrape(fs_env, fs, registry, digest=d)
    assert value(s, "stargz_fs_layer_fetched_size_bytes", **where) == before
    assert (mp / "data/noise.bin").read_bytes()
    deadline = time.monotonic() + 10
    while fs_env.run(_fetched_size(fs.layer(d))) == before:
        assert time.monotonic() < deadline, "the chunks of data/noise.bin never reached the disk"
        time.sleep(0.01)
    s, _, fetched_now = scrape(fs_env, fs, registry, digest=d)
    assert value(s, "stargz_fs_layer_fetched_size_bytes", **where) == fetched_now > before

    # the same layer at a second mount point: one series per mount point for the gauges
    mp2 = fs_env.mount(layer)
    s = scrape(fs_env, fs)
    assert sorted(x["mountpoint"] for x in series(s, "stargz_fs_layer_size_bytes")) == sorted(
        [str(mp), str(mp2)]
    )
    assert len(series(s, "stargz_fs_operation_count")) == 2  # still one layer, two op types
    assert value(s, "stargz_fs_snapshot_mounts") == 2

    # unmounted: its series go, the daemon-wide counters stay
    fs_env.run(fs.unmount(str(mp)))
    fs_env.run(fs.unmount(str(mp2)))
    s = scrape(fs_env, fs)
    assert not series(s, "stargz_fs_operation_count")
    assert not series(s, "stargz_fs_layer_size_bytes")
    assert value(s, "stargz_fs_unmounts_total") == 2
    assert value(s, "stargz_fs_open_layers") == 0


def test_verification_failures_are_counted_and_outlive_the_layer(fs_env, corners, tmp_path):
    layer = corners.layers("esgz")[0]
    bad = corrupt_first_chunk(layer, tmp_path / "bad-blob", "data/noise.bin")
    fs = fs_env.start(LocalLayerSource(blobs={layer.digest: bad}))
    mp = fs_env.mount(layer)
    fd = os.open(mp / "data/noise.bin", os.O_RDONLY | os.O_DIRECT)
    try:
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
    assert e.value.errno == errno.EIO

    s, m, _ = scrape(fs_env, fs, digest=layer.digest)
    failures = value(s, "stargz_fs_layer_verification_failures_total", layer=layer.digest)
    assert failures == m.verification_failures >= 1
    assert value(s, "stargz_fs_verification_failures_total") == failures
    assert value(s, "stargz_fs_layer_read_errors_total", layer=layer.digest) == m.read_errors >= 1

    fs_env.run(fs.unmount(str(mp)))
    s = scrape(fs_env, fs)
    assert not series(s, "stargz_fs_layer_verification_failures_total")
    assert value(s, "stargz_fs_verification_failures_total") == failures


def test_one_layer_digest_from_two_repositories_is_one_series(fs_env, corners, corners_source):
    """The same digest mounted from two repositories is two layers; each series still
    appears once, with the counters of both."""
    from stargz.fs.source import STARGZ_REFERENCE_LABEL

    fs = fs_env.start(corners_source)
    layer = corners.layers("esgz")[0]
    a = fs_env.mount(layer, **{STARGZ_REFERENCE_LABEL: "one.test/img:1"})
    b = fs_env.mount(layer, **{STARGZ_REFERENCE_LABEL: "two.test/img:1"})
    la, lb = fs.layer(str(a)), fs.layer(str(b))
    assert la is not lb
    (a / "data/xattr-file").read_bytes()
    (b / "data/text.txt").read_bytes()
    text = fs_env.run(_render(fs)).decode()
    d = layer.digest
    mine = [x for x in text.splitlines() if f'layer="{d}"' in x]
    assert mine
    assert len(mine) == len({line.rsplit(" ", 1)[0] for line in mine}), "duplicate series"
    samples = scrape(fs_env, fs)
    got = value(
        samples, "stargz_fs_operation_count", operation_type="on_demand_read_access_count", layer=d
    )
    assert got == la.metrics.reads + lb.metrics.reads > 0


async def _render(fs) -> bytes:
    return generate_latest(make_registry(fs))
