"""Plain counters for the filesystem; `stargz.service.metrics` exports them to Prometheus,
reading them at scrape time (nothing here costs the read path more than an integer add).

Names follow the Go snapshotter's operation types where one exists (SPEC §5):
``on_demand_remote_registry_fetch_count``, ``on_demand_bytes_fetched``,
``on_demand_bytes_served``, ``prefetch_download``... so the exporter can map them 1:1.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import ClassVar

from stargz.remote.redact import redact_text

#: A kept error message is cut here.
MAX_ERROR_MESSAGE = 500


@dataclass
class LayerMetrics:
    """Counters of one mounted layer (one blob digest). Monotonic while the layer lives."""

    #: Range requests sent to the blob source, and the compressed bytes they returned.
    fetch_requests: int = 0
    fetched_bytes: int = 0
    #: Fetches caused by a read that missed every cache (Go: on_demand_remote_registry_fetch_count).
    on_demand_fetches: int = 0
    on_demand_bytes_fetched: int = 0
    #: Reads that fetched a member ahead of the prefetch piece it was queued in.
    overtakes: int = 0
    prefetch_bytes: int = 0
    background_bytes: int = 0
    #: Chunk lookups of the read path, by where the data came from.
    memory_hits: int = 0
    disk_hits: int = 0
    inflight_hits: int = 0
    cache_misses: int = 0
    #: Chunks whose bytes did not match their chunkDigest (or failed to decode): never served.
    verification_failures: int = 0
    #: Cache files that were dropped because they did not hold what their name promises.
    disk_cache_rejects: int = 0
    #: read() calls answered and bytes returned (Go: on_demand_read_access_count/bytes_served).
    reads: int = 0
    bytes_served: int = 0
    read_errors: int = 0
    #: Pages pushed into the kernel page cache with notify_store (bytes).
    notify_store_bytes: int = 0
    #: Seconds: open (tail + TOC) and prefetch duration; 0 until known.
    open_seconds: float = 0.0
    #: Of open_seconds: waiting for the tail/TOC bytes, and building the reader + index.
    open_fetch_seconds: float = 0.0
    #: Resolving the blob (registry lookups) before the open, and building the FUSE tree.
    resolve_seconds: float = 0.0
    tree_seconds: float = 0.0
    open_parse_seconds: float = 0.0
    prefetch_seconds: float = 0.0

    #: The last read, fetch or verification failure and its wall-clock time, for
    #: ``stargz status``. Not counters, so not dataclass fields (exporters walk the fields);
    #: the class values are the "none yet" defaults, `note_error` sets the instance's.
    last_error: ClassVar[str] = ""
    last_error_time: ClassVar[float] = 0.0

    def note_error(self, message: str) -> None:
        """Keep ``message`` as the layer's last error: URLs redacted (a pre-signed URL's
        query is a credential), cut to a bound."""
        self.last_error = redact_text(message)[:MAX_ERROR_MESSAGE]  # type: ignore[misc]
        self.last_error_time = time.time()  # type: ignore[misc]

    @property
    def cache_hits(self) -> int:
        return self.memory_hits + self.disk_hits + self.inflight_hits

    def as_dict(self) -> dict[str, float]:
        d = asdict(self)
        d["cache_hits"] = self.cache_hits
        return d


@dataclass
class FsMetrics:
    """Counters of the whole filesystem (all layers)."""

    #: FUSE handler calls that raised something other than FUSEError (answered EIO).
    handler_errors: int = 0
    #: Opens answered with FUSE passthrough (the kernel reads a cache file directly).
    passthrough_opens: int = 0
    mounts: int = 0
    mount_failures: int = 0
    unmounts: int = 0
    checks: int = 0
    check_failures: int = 0
    #: Chunk files evicted from the disk cache to stay under its byte bound.
    disk_evictions: int = 0
    disk_evicted_bytes: int = 0
    #: Disk cache files (chunks, merged passthrough files, TOC tails) found at start whose
    #: bytes did not match their checksum: deleted and fetched again, never served.
    cache_checksum_failures: int = 0
    #: Verification failures of layers no longer open (an open layer counts its own), so
    #: the daemon-wide total does not drop when a layer is unmounted.
    closed_layers_verification_failures: int = 0
    #: Neighbour layers (named in a mounted layer's labels) whose resolve + TOC fetch was
    #: started ahead of their own mount; of those: taken by their mount, failed, released
    #: unused after the hold time, dropped at once over the byte bound.
    neighbour_fetches: int = 0
    neighbour_hits: int = 0
    neighbour_failures: int = 0
    neighbour_expired: int = 0
    neighbour_dropped: int = 0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)
