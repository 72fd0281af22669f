"""The Prometheus endpoint of ``containerd-stargz-grpc`` (``metrics_address``).

- the collector's mapping, counter by counter, on constructed counters (no FUSE);
- a real daemon lazily mounting a layer from a real registry: a read through the mount
  shows up in a scrape of ``/metrics``, under the layer's digest;
- a bad ``metrics_address``, or one already in use: a clear error naming the key;
- ``no_prometheus = true``: nothing listens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from harness.procs import REPO, StargzDaemon, free_port, make_tempdir, mounts_under
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stargz.fs.metrics import FsMetrics, LayerMetrics
from stargz.service.metrics import make_registry
from stargz.service.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb

NO_LAZY = ["--no-lazy"]
D = "sha256:" + "ab" * 32


def parse(text: str) -> tuple[dict[tuple[str, frozenset], float], dict[str, str]]:
    """({(sample name, labels): value}, {family name: type}) of a text exposition."""
    samples, types = {}, {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, types


def value(samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


# --- the collector's mapping, on constructed counters ----------------------------------------


class _Flag:
    def __init__(self, on: bool) -> None:
        self.on = on

    def is_set(self) -> bool:
        return self.on


class _Layer:
    digest = D
    size = 1000
    prefetch_size = 300

    def __init__(self, metrics: LayerMetrics, prefetched: bool) -> None:
        self.metrics = metrics
        self.prefetch_done = _Flag(prefetched)

    def fetched_size(self) -> int:
        return 700


class _Cache:
    generation = 0

    def __init__(self, nbytes: int, n: int) -> None:
        self.bytes, self.n = nbytes, n

    def __len__(self) -> int:
        return self.n


class _Fs:
    """What the collector reads of a StargzFileSystem."""

    def __init__(self, layers) -> None:
        self.metrics = FsMetrics(
            **{f.name: 1000 + i for i, f in enumerate(dataclasses.fields(FsMetrics))}
        )
        self.disk, self.memory = _Cache(5000, 50), _Cache(6000, 60)
        self._layers = layers

    def open_layers(self):
        return self._layers


def distinct_layer_metrics() -> LayerMetrics:
    """Every field a different value, so a field exported under the wrong name shows."""
    values = {}
    for i, f in enumerate(dataclasses.fields(LayerMetrics)):
        values[f.name] = (i + 1) * 0.25 if f.type == "float" else (i + 1) * 10
    # fetched_bytes is the sum of the kinds plus the open (tail) bytes
    values["fetched_bytes"] = (
        values["on_demand_bytes_fetched"] + values["prefetch_bytes"] + values["background_bytes"]
    ) + 4242
    return LayerMetrics(**values)


def test_collector_exports_each_counter_under_its_name():
    m = distinct_layer_metrics()
    fs = _Fs([(_Layer(m, prefetched=True), ("/s/1/fs", "/s/2/fs"))])
    samples, types = parse(generate_latest(make_registry(fs)).decode())

    # Go's names, labels and (where prometheus-client allows) types
    op = "stargz_fs_operation_count"
    assert types[op] == "unknown"  # Go's counter; untyped keeps the series name
    assert value(samples, op, operation_type="on_demand_read_access_count", layer=D) == m.reads
    assert (
        value(samples, op, operation_type="on_demand_remote_registry_fetch_count", layer=D)
        == m.on_demand_fetches
    )
    bs = "stargz_fs_bytes_served"
    assert types[bs] == "gauge"  # as in Go
    assert value(samples, bs, operation_type="on_demand_bytes_served", layer=D) == m.bytes_served
    assert (
        value(samples, bs, operation_type="on_demand_bytes_fetched", layer=D)
        == m.on_demand_bytes_fetched
    )
    for mp in ("/s/1/fs", "/s/2/fs"):
        where = {"digest": D, "mountpoint": mp}
        assert value(samples, "stargz_fs_layer_size_bytes", **where) == 1000
        assert value(samples, "stargz_fs_layer_fetched_size_bytes", **where) == 700
        assert value(samples, "stargz_fs_layer_prefetch_size_bytes", **where) == 300

    # ours, per layer
    kinds = {
        "open": 4242,
        "on_demand": m.on_demand_bytes_fetched,
        "prefetch": m.prefetch_bytes,
        "background": m.background_bytes,
    }
    for kind, want in kinds.items():
        assert value(samples, "stargz_fs_layer_fetched_bytes_total", layer=D, kind=kind) == want
    lookups = {
        "memory": m.memory_hits,
        "disk": m.disk_hits,
        "inflight": m.inflight_hits,
        "miss": m.cache_misses,
    }
    for result, want in lookups.items():
        got = value(samples, "stargz_fs_layer_chunk_lookups_total", layer=D, result=result)
        assert got == want, result
    per_layer = {
        "stargz_fs_layer_fetch_requests_total": m.fetch_requests,
        "stargz_fs_layer_verification_failures_total": m.verification_failures,
        "stargz_fs_layer_disk_cache_rejects_total": m.disk_cache_rejects,
        "stargz_fs_layer_read_errors_total": m.read_errors,
        "stargz_fs_layer_notify_store_bytes_total": m.notify_store_bytes,
        "stargz_fs_layer_overtakes_total": m.overtakes,
        "stargz_fs_layer_prefetch_duration_seconds": m.prefetch_seconds,
    }
    for name, want in per_layer.items():
        assert value(samples, name, layer=D) == want, name
    steps = {
        "resolve": m.resolve_seconds,
        "fetch_toc": m.open_fetch_seconds,
        "parse_toc": m.open_parse_seconds,
        "build_tree": m.tree_seconds,
    }
    for step, want in steps.items():
        got = value(samples, "stargz_fs_layer_open_duration_seconds", layer=D, step=step)
        assert got == want, step

    # daemon-wide
    f = fs.metrics
    daemon = {
        "stargz_fs_mounts_total": f.mounts,
        "stargz_fs_mount_failures_total": f.mount_failures,
        "stargz_fs_unmounts_total": f.unmounts,
        "stargz_fs_checks_total": f.checks,
        "stargz_fs_check_failures_total": f.check_failures,
        "stargz_fs_handler_errors_total": f.handler_errors,
        "stargz_fs_passthrough_opens_total": f.passthrough_opens,
        "stargz_fs_disk_cache_evictions_total": f.disk_evictions,
        "stargz_fs_disk_cache_evicted_bytes_total": f.disk_evicted_bytes,
        "stargz_fs_cache_checksum_failures_total": f.cache_checksum_failures,
        "stargz_fs_neighbour_fetches_total": f.neighbour_fetches,
        "stargz_fs_neighbour_hits_total": f.neighbour_hits,
        "stargz_fs_neighbour_failures_total": f.neighbour_failures,
        "stargz_fs_neighbour_expired_total": f.neighbour_expired,
        "stargz_fs_neighbour_dropped_total": f.neighbour_dropped,
        "stargz_fs_verification_failures_total": (
            f.closed_layers_verification_failures + m.verification_failures
        ),
        "stargz_fs_open_layers": 1,
        "stargz_fs_snapshot_mounts": 2,
        "stargz_fs_disk_cache_bytes": 5000,
        "stargz_fs_disk_cache_chunks": 50,
        "stargz_fs_memory_cache_bytes": 6000,
        "stargz_fs_memory_cache_chunks": 60,
    }
    for name, want in daemon.items():
        assert value(samples, name) == want, name
    for name in daemon:
        if name.endswith("_total"):
            assert types[name.removesuffix("_total")] == "counter", name


def test_prefetch_size_and_duration_wait_for_the_prefetch_to_finish():
    fs = _Fs([(_Layer(distinct_layer_metrics(), prefetched=False), ("/s/1/fs",))])
    samples, _ = parse(generate_latest(make_registry(fs)).decode())
    where = {"digest": D, "mountpoint": "/s/1/fs"}
    assert value(samples, "stargz_fs_layer_prefetch_size_bytes", **where) == 0
    assert not [n for n, _ in samples if n == "stargz_fs_layer_prefetch_duration_seconds"]


def test_each_registry_is_its_own():
    """Two registries (two daemons in one process, or tests) never collide, and the
    global default registry is left alone."""
    from prometheus_client import REGISTRY

    before = {m.name for m in REGISTRY.collect()}
    a, b = make_registry(_Fs([])), make_registry(_Fs([]))
    assert generate_latest(a) and generate_latest(b)
    assert {m.name for m in REGISTRY.collect()} == before
    assert not [n for n in before if n.startswith("stargz_")]


def test_server_serves_until_stopped():
    """In one process: port 0 picks a free port (``url`` names it), ``/metrics`` answers,
    other paths are 404, and after ``stop`` nothing listens and the port is free again."""
    from stargz.service.metrics import MetricsServer

    def get(url: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, b""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await MetricsServer.start("127.0.0.1:0", _Fs([]))
        url = server.url
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        assert url == f"http://127.0.0.1:{port}/metrics" and port
        status, body = await loop.run_in_executor(None, get, url)
        assert status == 200 and b"\nstargz_fs_open_layers 0.0\n" in body
        status, _ = await loop.run_in_executor(None, get, url.replace("/metrics", "/"))
        assert status == 404
        await server.stop()
        assert not listening(port)
        with socket.socket() as s:  # (a listener would still refuse SO_REUSEADDR)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()

    asyncio.run(main())


# --- the real daemon ---------------------------------------------------------------------


def daemon_cmd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stargz.cli.daemon", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
    )


@pytest.fixture
def workdir():
    d = make_tempdir("sgz-m-")
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


def scrape(port: int) -> tuple[dict[tuple[str, frozenset], float], dict[str, str]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return parse(r.read().decode())


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_lazily_read_layer_is_scraped_under_its_digest(e2e_host, registry, corners):
    """A real daemon (lazy pulling on) with ``metrics_address``, a real registry: the
    remote-snapshot Prepare containerd's unpacker sends mounts ``oci-corners:esgz``'s first
    layer through FUSE, a file is read through that mount, and ``/metrics`` then shows the
    read and the bytes served for that layer's digest, and the layer's gauges for the
    snapshot's mount point."""
    ref = registry.push_oci(corners.root, "esgz", "metrics/corners:esgz")
    layer = corners.layers("esgz")[0]
    port = free_port()
    sd = StargzDaemon.start(
        config_text=f'metrics_address = "127.0.0.1:{port}"\nno_background_fetch = true\n'
    )
    try:
        chain = "sha256:" + "cd" * 32
        labels = {
            "containerd.io/snapshot.ref": chain,
            "containerd.io/snapshot/remote/stargz.reference": ref,
            "containerd.io/snapshot/remote/stargz.digest": layer.digest,
            "containerd.io/snapshot/stargz/toc.digest": layer.toc_digest,
        }
        with sd.channel() as ch, pytest.raises(grpc.RpcError) as e:
            sd.stub(ch).Prepare(
                pb.PrepareSnapshotRequest(key=f"extract-1 {chain}", labels=labels),
                metadata=(("containerd-namespace", "metrics"),),
                timeout=60,
            )
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS, e.value  # a remote snapshot
        (mp,) = [
            p
            for p, m in mounts_under(Path(sd.root) / "snapshots").items()
            if m.root == "/" + layer.digest.split(":")[1]
        ]
        data = (Path(mp) / "data" / "xattr-file").read_bytes()
        assert data

        samples, _ = scrape(port)
        d = layer.digest
        op, bs = "stargz_fs_operation_count", "stargz_fs_bytes_served"
        assert value(samples, op, operation_type="on_demand_read_access_count", layer=d) > 0
        assert value(samples, op, operation_type="on_demand_remote_registry_fetch_count", layer=d)
        assert value(samples, bs, operation_type="on_demand_bytes_served", layer=d) >= len(data)
        assert value(samples, bs, operation_type="on_demand_bytes_fetched", layer=d) > 0
        where = {"digest": d, "mountpoint": mp}
        assert value(samples, "stargz_fs_layer_size_bytes", **where) == layer.size
        assert 0 < value(samples, "stargz_fs_layer_fetched_size_bytes", **where) < layer.size
        assert value(samples, "stargz_fs_mounts_total") == 1
        assert value(samples, "process_resident_memory_bytes") > 0

        assert sd.stop() == 0
        assert not listening(port)
    finally:
        sd.close()
    records = sd.log_records()
    assert [r["address"] for r in records if r["msg"] == "serving metrics"] == [
        f"http://127.0.0.1:{port}/metrics"
    ]
    assert records[-1]["msg"] == "stopped"
    bad = [r for r in records if r["level"] in ("warning", "error", "fatal")]
    assert not bad, bad  # (no "not implemented yet" warning for metrics_address either)


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("nope", "no port"),
        ("127.0.0.1:65536", "out of range"),
        ("::1:8234", "brackets"),
    ],
)
def test_a_bad_metrics_address_exits_2_naming_the_key(workdir, address, words):
    cfg = workdir / "config.toml"
    cfg.write_text(f'metrics_address = "{address}"\n')
    p = daemon_cmd(
        "--config", str(cfg), "--root", str(workdir / "r"), "--address", str(workdir / "s.sock")
    )
    assert p.returncode == 2
    (line,) = p.stderr.strip().splitlines()
    assert '"metrics_address"' in line and words in line and address in line, line


def test_a_metrics_port_in_use_fails_clearly(workdir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = workdir / "config.toml"
        cfg.write_text(f'metrics_address = "127.0.0.1:{port}"\n')
        sock = workdir / "s.sock"
        p = daemon_cmd(
            "--config", str(cfg), "--root", str(workdir / "r"), "--address", str(sock), *NO_LAZY
        )
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    errors = [ln for ln in p.stderr.splitlines() if '"level": "error"' in ln]
    assert len(errors) == 1 and "metrics_address" in errors[0] and f":{port}" in errors[0]
    assert "in use" in errors[0], errors[0]
    assert not sock.exists()  # failed before serving gRPC


def test_no_prometheus_means_no_listener():
    port = free_port()
    sd = StargzDaemon.start(
        config_text=f'metrics_address = "127.0.0.1:{port}"\nno_prometheus = true\n',
        extra_args=NO_LAZY,
    )
    try:
        assert not listening(port)
    finally:
        sd.close()
    msgs = [r["msg"] for r in sd.log_records()]
    assert "no_prometheus is set: metrics_address is not served" in msgs
    assert "serving metrics" not in msgs
