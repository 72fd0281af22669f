"""The daemon's Prometheus endpoint: ``http://<metrics_address>/metrics``, text format 0.0.4.

Nothing is observed on the read path. The filesystem keeps plain integer counters
(`stargz.fs.metrics`); `FsCollector` reads them when Prometheus scrapes, on the event
loop thread that owns them, so no lock is needed and a read costs what it cost before.

Names (namespace ``stargz``, subsystem ``fs``). Where the Go snapshotter has a metric for
the same thing, the series name and labels are Go's, so its dashboards carry over:

- ``stargz_fs_operation_count{operation_type, layer}``: ``on_demand_read_access_count``,
  ``on_demand_remote_registry_fetch_count``. Go declares it a counter; it is exposed here as
  *untyped*, because prometheus-client renames every counter to ``<name>_total`` and the
  series name is what queries use. It only grows (use ``rate()``).
- ``stargz_fs_bytes_served{operation_type, layer}``: ``on_demand_bytes_served``,
  ``on_demand_bytes_fetched``; a gauge, as in Go (which only ever adds to it).
- ``stargz_fs_layer_fetched_size_bytes``, ``stargz_fs_layer_prefetch_size_bytes``,
  ``stargz_fs_layer_size_bytes`` ``{digest, mountpoint}``: Go's ``layer_*_size`` with the
  ``_bytes`` unit suffix its go-metrics namespace appends; gauges (Go sends them as
  counters, but the fetched size drops when the disk cache evicts).

Go's latency histograms (``operation_duration_milliseconds``) are not emulated: the
durations measured here are one per layer, so they are gauges under our own names. Every
other metric is ours, named ``stargz_fs_*`` (counters end in ``_total``); the list, with
meanings, is in docs/snapshotter.md ("Metrics"). Per-layer series exist while the layer is
open, as in Go.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry

from stargz.config import split_tcp_address
from stargz.errors import FailedPrecondition
from stargz.fs.metrics import LayerMetrics

if TYPE_CHECKING:
    from stargz.fs.filesystem import StargzFileSystem
    from stargz.snapshot.refusals import Refusals

log = logging.getLogger("stargz.metrics")

#: The classic text format, as Go's promhttp serves by default (recent prometheus-client
#: releases label the same bytes "version=1.0.0", which older scrapers may not know).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: (Go operation_type, LayerMetrics field) of ``stargz_fs_operation_count``.
OPERATION_COUNTS = (
    ("on_demand_read_access_count", "reads"),
    ("on_demand_remote_registry_fetch_count", "on_demand_fetches"),
)
#: (Go operation_type, LayerMetrics field) of ``stargz_fs_bytes_served``.
BYTES_SERVED = (
    ("on_demand_bytes_served", "bytes_served"),
    ("on_demand_bytes_fetched", "on_demand_bytes_fetched"),
)
#: Label value of ``stargz_fs_layer_chunk_lookups_total{result}`` -> LayerMetrics field.
CHUNK_LOOKUPS = (
    ("memory", "memory_hits"),
    ("disk", "disk_hits"),
    ("inflight", "inflight_hits"),
    ("miss", "cache_misses"),
)
#: Per-layer counters without extra labels: (name without _total, field, help).
LAYER_COUNTERS = (
    (
        "stargz_fs_layer_fetch_requests",
        "fetch_requests",
        "Range requests sent to the layer's blob source (registry), all kinds.",
    ),
    (
        "stargz_fs_layer_verification_failures",
        "verification_failures",
        "Chunks whose bytes did not match their TOC chunkDigest or failed to decode; "
        "never served (the read gets EIO).",
    ),
    (
        "stargz_fs_layer_disk_cache_rejects",
        "disk_cache_rejects",
        "Disk cache files of this layer dropped because their size or content was wrong.",
    ),
    (
        "stargz_fs_layer_read_errors",
        "read_errors",
        "FUSE reads of this layer answered with an error (EIO).",
    ),
    (
        "stargz_fs_layer_overtakes",
        "overtakes",
        "Reads that fetched a file's member themselves instead of waiting for the "
        "prefetch piece it was queued in.",
    ),
    (
        "stargz_fs_layer_notify_store_bytes",
        "notify_store_bytes",
        "Bytes pushed into the kernel page cache (FUSE notify_store) after a prefetch.",
    ),
)
#: Step label of ``stargz_fs_layer_open_duration_seconds`` -> LayerMetrics field.
OPEN_STEPS = (
    ("resolve", "resolve_seconds"),
    ("fetch_toc", "open_fetch_seconds"),
    ("parse_toc", "open_parse_seconds"),
    ("build_tree", "tree_seconds"),
)
#: Daemon-wide counters: (name without _total, FsMetrics field, help).
FS_COUNTERS = (
    ("stargz_fs_mounts", "mounts", "Layer mounts that succeeded (one per snapshot)."),
    ("stargz_fs_mount_failures", "mount_failures", "Layer mounts that failed."),
    ("stargz_fs_unmounts", "unmounts", "Snapshot mount points unbound from a layer."),
    ("stargz_fs_checks", "checks", "Check calls (containerd asks before using a layer)."),
    ("stargz_fs_check_failures", "check_failures", "Check calls that failed (UNAVAILABLE)."),
    (
        "stargz_fs_handler_errors",
        "handler_errors",
        "FUSE requests that raised an unexpected error (logged, answered EIO).",
    ),
    (
        "stargz_fs_passthrough_opens",
        "passthrough_opens",
        "Opens answered with FUSE passthrough (the kernel reads a cache file directly).",
    ),
    (
        "stargz_fs_disk_cache_evictions",
        "disk_evictions",
        "Chunk files evicted from the disk cache to stay under its size bound.",
    ),
    (
        "stargz_fs_disk_cache_evicted_bytes",
        "disk_evicted_bytes",
        "Bytes of the chunk files evicted from the disk cache.",
    ),
    (
        "stargz_fs_cache_checksum_failures",
        "cache_checksum_failures",
        "Disk cache files (chunks, merged passthrough files, TOC tails) found after a start "
        "whose bytes did not match their checksum: deleted and fetched again, never served.",
    ),
    (
        "stargz_fs_neighbour_fetches",
        "neighbour_fetches",
        "Layers named in another layer's labels whose resolve + TOC fetch started ahead of "
        "their own mount.",
    ),
    (
        "stargz_fs_neighbour_hits",
        "neighbour_hits",
        "Mounts that took a neighbour TOC fetched ahead (or waited for it) instead of fetching it.",
    ),
    (
        "stargz_fs_neighbour_failures",
        "neighbour_failures",
        "Neighbour resolves that failed (the layer's own mount tries again).",
    ),
    (
        "stargz_fs_neighbour_expired",
        "neighbour_expired",
        "Neighbour TOCs released unused after resolve_result_entry_ttl_sec.",
    ),
    (
        "stargz_fs_neighbour_dropped",
        "neighbour_dropped",
        "Neighbour TOCs dropped at once: they would exceed resolve_neighbours_max_bytes.",
    ),
)


class FsCollector(Collector):
    """Reads a `StargzFileSystem`'s counters when scraped. Call `collect` on the event loop
    thread (the aiohttp handler does)."""

    def __init__(self, fs: StargzFileSystem) -> None:
        self.fs = fs

    def collect(self) -> Iterator[Metric]:
        fs = self.fs
        layers = fs.open_layers()
        yield from self._go_compatible(layers)
        yield from self._per_layer(layers)
        yield from self._daemon_wide(layers)

    @staticmethod
    def _by_digest(layers) -> list[tuple[str, LayerMetrics, bool]]:
        """``(digest, metrics, prefetch done)`` once per layer digest: the same digest
        mounted from two repositories is two layers, and a series must appear once (the
        counters add up; the durations are the longest)."""
        out: dict[str, tuple[str, LayerMetrics, bool]] = {}
        for layer, _ in layers:
            d, m, done = layer.digest, layer.metrics, layer.prefetch_done.is_set()
            seen = out.get(d)
            if seen is None:
                out[d] = (d, m, done)
                continue
            merged = LayerMetrics()
            for f in dataclasses.fields(LayerMetrics):
                a, b = getattr(seen[1], f.name), getattr(m, f.name)
                setattr(merged, f.name, max(a, b) if f.name.endswith("_seconds") else a + b)
            out[d] = (d, merged, seen[2] or done)
        return list(out.values())

    def _go_compatible(self, layers) -> Iterator[Metric]:
        ops = UnknownMetricFamily(
            "stargz_fs_operation_count",
            "The count of stargz snapshotter operations. Broken down by operation type and "
            "layer sha. (Go's counter; untyped here to keep its series name.)",
            labels=["operation_type", "layer"],
        )
        served = GaugeMetricFamily(
            "stargz_fs_bytes_served",
            "The number of bytes served per stargz snapshotter operations. Broken down by "
            "operation type and layer sha.",
            labels=["operation_type", "layer"],
        )
        fetched = GaugeMetricFamily(
            "stargz_fs_layer_fetched_size_bytes",
            "Total fetched size of the layer (compressed bytes in the disk cache)",
            labels=["digest", "mountpoint"],
        )
        prefetch = GaugeMetricFamily(
            "stargz_fs_layer_prefetch_size_bytes",
            "Total prefetched size of the layer (0 until the prefetch has finished)",
            labels=["digest", "mountpoint"],
        )
        size = GaugeMetricFamily(
            "stargz_fs_layer_size_bytes",
            "Total size of the layer (compressed blob)",
            labels=["digest", "mountpoint"],
        )
        for d, m, _ in self._by_digest(layers):
            for op, field in OPERATION_COUNTS:
                ops.add_metric([op, d], getattr(m, field))
            for op, field in BYTES_SERVED:
                served.add_metric([op, d], getattr(m, field))
        for layer, mountpoints in layers:
            d = layer.digest
            if not mountpoints:
                continue
            # (a counter the layer keeps as chunks reach or leave the disk cache)
            fetched_size = layer.fetched_size()
            prefetched = layer.prefetch_size if layer.prefetch_done.is_set() else 0
            for mp in mountpoints:
                fetched.add_metric([d, mp], fetched_size)
                prefetch.add_metric([d, mp], prefetched)
                size.add_metric([d, mp], layer.size)
        yield from (ops, served, fetched, prefetch, size)

    def _per_layer(self, layers) -> Iterator[Metric]:
        by_kind = CounterMetricFamily(
            "stargz_fs_layer_fetched_bytes",
            "Compressed bytes fetched from the layer's blob source, by why: open (footer and "
            "TOC), on_demand (a read missed every cache), prefetch, background.",
            labels=["layer", "kind"],
        )
        lookups = CounterMetricFamily(
            "stargz_fs_layer_chunk_lookups",
            "Chunk lookups of the read path by where the data was: memory, disk, inflight "
            "(a fetch already under way), miss (fetched on demand).",
            labels=["layer", "result"],
        )
        counters = [
            (CounterMetricFamily(name, doc, labels=["layer"]), field)
            for name, field, doc in LAYER_COUNTERS
        ]
        open_steps = GaugeMetricFamily(
            "stargz_fs_layer_open_duration_seconds",
            "Time each step of opening the layer took, measured once per layer: resolve "
            "(registry lookups), fetch_toc (footer and TOC bytes), parse_toc (reader and "
            "index), build_tree (the FUSE tree).",
            labels=["layer", "step"],
        )
        prefetch_seconds = GaugeMetricFamily(
            "stargz_fs_layer_prefetch_duration_seconds",
            "Time the layer's prefetch took (present once it has finished).",
            labels=["layer"],
        )
        for d, m, prefetch_done in self._by_digest(layers):
            kinds = {
                "on_demand": m.on_demand_bytes_fetched,
                "prefetch": m.prefetch_bytes,
                "background": m.background_bytes,
            }
            kinds["open"] = max(0, m.fetched_bytes - sum(kinds.values()))
            for kind in ("open", "on_demand", "prefetch", "background"):
                by_kind.add_metric([d, kind], kinds[kind])
            for result, field in CHUNK_LOOKUPS:
                lookups.add_metric([d, result], getattr(m, field))
            for family, field in counters:
                family.add_metric([d], getattr(m, field))
            for step, field in OPEN_STEPS:
                open_steps.add_metric([d, step], getattr(m, field))
            if prefetch_done:
                prefetch_seconds.add_metric([d], m.prefetch_seconds)
        yield from (by_kind, lookups, *(f for f, _ in counters), open_steps, prefetch_seconds)

    def _daemon_wide(self, layers) -> Iterator[Metric]:
        fs = self.fs
        m = fs.metrics
        for name, field, doc in FS_COUNTERS:
            yield CounterMetricFamily(name, doc, value=getattr(m, field))
        failures = m.closed_layers_verification_failures + sum(
            layer.metrics.verification_failures for layer, _ in layers
        )
        yield CounterMetricFamily(
            "stargz_fs_verification_failures",
            "Chunks that failed verification, all layers since the daemon started (also "
            "those unmounted since). Any increase means corrupt data from the registry.",
            value=failures,
        )
        yield GaugeMetricFamily("stargz_fs_open_layers", "Layers open now.", value=len(layers))
        yield GaugeMetricFamily(
            "stargz_fs_snapshot_mounts",
            "Snapshot directories a layer is bound to now.",
            value=sum(len(mps) for _, mps in layers),
        )
        yield GaugeMetricFamily(
            "stargz_fs_disk_cache_bytes",
            "Disk space of the files in the disk cache (chunks and merged passthrough "
            "files), in whole filesystem blocks: what max_size_bytes bounds.",
            fs.disk.bytes,
        )
        yield GaugeMetricFamily(
            "stargz_fs_disk_cache_chunks",
            "Files in the disk cache (chunks and merged passthrough files).",
            len(fs.disk),
        )
        yield GaugeMetricFamily(
            "stargz_fs_memory_cache_bytes",
            "Bytes of decompressed chunks in the memory cache.",
            fs.memory.bytes,
        )
        yield GaugeMetricFamily(
            "stargz_fs_memory_cache_chunks", "Chunks in the memory cache.", len(fs.memory)
        )


class RefusalCollector(Collector):
    """Layers containerd asked for as remote snapshots and got unpacked, by reason."""

    def __init__(self, refusals: Refusals) -> None:
        self.refusals = refusals

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "stargz_snapshot_remote_refusals",
            "Layers not mounted lazily (containerd unpacked them), by reason code.",
            labels=["reason"],
        )
        for reason, n in sorted(self.refusals.totals.items()):
            family.add_metric([reason], n)
        yield family


def make_registry(fs: StargzFileSystem | None) -> CollectorRegistry:
    """A registry of our own (not prometheus-client's global one): the filesystem's
    metrics (if there is a filesystem) and the process's (``process_*``: CPU, memory, fds)."""
    registry = CollectorRegistry()
    if fs is not None:
        registry.register(FsCollector(fs))
    ProcessCollector(registry=registry)
    return registry


class _Collected:
    """Metric families already collected (immutable), for `generate_latest` in a thread."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class MetricsServer:
    """``GET /metrics`` on a TCP address, served by aiohttp on the daemon's event loop.

    aiohttp rather than prometheus-client's threaded server: the collector then runs on the
    loop thread that owns the counters (no locks, no torn reads), and start, bind errors and
    stop are plain awaits in the daemon's main.
    """

    def __init__(self, address: str, registry: CollectorRegistry, runner: web.AppRunner) -> None:
        self.address = address
        self.registry = registry
        self._runner = runner

    def add_refusals(self, refusals: Refusals) -> None:
        """Count the snapshotter's refusals too (it opens after the endpoint starts)."""
        self.registry.register(RefusalCollector(refusals))

    @classmethod
    async def start(cls, address: str, fs: StargzFileSystem | None) -> MetricsServer:
        """Listen on ``address`` (``host:port``, validated by `stargz.config`).

        Raises FailedPrecondition naming ``metrics_address`` when it cannot listen (port in
        use, address not on this host, unknown host name)."""
        host, port = split_tcp_address(address)
        registry = make_registry(fs)

        async def handle(request: web.Request) -> web.Response:
            # read the counters here, on the loop; format the text (most of a scrape's
            # time: ~0.3 ms a layer) in a thread, off the loop that serves FUSE
            families = list(registry.collect())
            body = await asyncio.get_running_loop().run_in_executor(
                None, generate_latest, _Collected(families)
            )
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

        app = web.Application()
        app.router.add_get("/metrics", handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as e:
            await runner.cleanup()
            raise FailedPrecondition(
                f'cannot serve metrics on metrics_address "{address}": {e}'
            ) from None
        self = cls(address, registry, runner)
        log.info("serving metrics", extra={"address": self.url})
        return self

    @property
    def url(self) -> str:
        """``http://host:port/metrics`` of the first listening socket (the real port when
        the configured one is 0)."""
        host, port = self._runner.addresses[0][:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/metrics"

    async def stop(self) -> None:
        """Close the listener and any open connection."""
        await self._runner.cleanup()


__all__ = ["FsCollector", "MetricsServer", "make_registry"]
