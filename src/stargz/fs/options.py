"""The knobs of the filesystem, built from the daemon's loaded `stargz.config.Config`.

`stargz.config` is the one source of the keys, their defaults and their validation; the
defaults below are read from it. Upstream keys (SPEC §3) keep their names and meaning
(``[blob]`` numbers where 0 means the default are read through
`stargz.remote.options.BlobOptions`, like the registry client's); keys that are ours are
marked "ours". Fields under "scheduling" have no config key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stargz.config import Config
from stargz.errors import InvalidArgument
from stargz.remote.options import BlobOptions

MiB = 1 << 20
_C = Config()
_BLOB = BlobOptions.from_config(_C.blob)


@dataclass(frozen=True)
class FsOptions:
    # --- top level (upstream) ---
    prefetch_size: int = _C.prefetch_size
    prefetch_timeout_sec: float = float(_C.prefetch_timeout_sec)
    #: Prefetches larger than this do not hold up Check (0 = always wait).
    prefetch_async_size: int = _C.prefetch_async_size
    noprefetch: bool = _C.noprefetch
    no_background_fetch: bool = _C.no_background_fetch
    allow_no_verification: bool = _C.allow_no_verification
    disable_verification: bool = _C.disable_verification
    #: Concurrent background-fetch tasks across all layers.
    max_concurrency: int = _C.max_concurrency
    log_file_access: bool = _C.log_file_access
    #: Seconds Mount waits for the source to resolve a layer (Go: 30 s, not configurable).
    resolve_timeout_sec: float = 30.0
    # --- [blob] (upstream) ---
    #: Fetch granularity: small on-demand fetches are widened to this many bytes.
    chunk_size: int = _BLOB.chunk_size
    #: Per-request timeout of a chunk fetch.
    fetching_timeout_sec: float = float(_BLOB.fetching_timeout_sec)
    #: Largest single GET of a prefetch (0 = one request for the whole prefetch range).
    prefetch_chunk_size: int = _BLOB.prefetch_chunk_size
    #: Seconds between connectivity re-checks in Check (0 = always check).
    valid_interval: float = _BLOB.check_interval
    # --- [directory_cache] ---
    max_cache_fds: int = _C.directory_cache.max_cache_fds
    #: Resolve reads only once the chunk is on disk (upstream ``sync_add``).
    sync_add: bool = _C.directory_cache.sync_add
    #: ours (``[directory_cache] max_size_bytes``): disk cache bound; 0 = unbounded.
    disk_cache_max_bytes: int = _C.directory_cache.max_size_bytes
    #: ours (``[directory_cache] max_memory_bytes``): memory LRU of decompressed chunks.
    memory_cache_bytes: int = _C.directory_cache.max_memory_bytes
    # --- [fuse] ---
    attr_timeout: float = float(_C.fuse.attr_timeout)
    entry_timeout: float = float(_C.fuse.entry_timeout)
    #: ours (``[fuse] read_ahead_kb``): set on the FUSE bdi after mounting (0 = leave as is).
    read_ahead_kb: int = _C.fuse.read_ahead_kb
    #: ours (``[fuse] notify_store``): push cached chunks into the page cache on open.
    notify_store: bool = _C.fuse.notify_store
    #: ``[fuse] passthrough``: the kernel reads verified cache files straight from disk
    #: (needs kernel >= 6.9 with CONFIG_FUSE_PASSTHROUGH and CAP_SYS_ADMIN). "auto" (ours,
    #: the default; upstream's is false): on where the kernel offers it, quietly off where
    #: not; True: wanted, a warning where the kernel lacks it; False: off.
    passthrough: bool | str = _C.fuse.passthrough
    #: "trusted" or "user": which opaque xattr marks `.wh..wh..opq` dirs (userxattr overlay).
    opaque_xattr: str = "trusted"
    # --- scheduling (ours, not configurable upstream) ---
    #: Quiet time after a Mount/Check before background fetch resumes (Go: 5 s).
    background_silence_sec: float = 5.0
    #: Quiet time after an on-demand fetch before background fetch resumes.
    background_read_silence_sec: float = 0.2
    #: Bytes per background range request.
    background_request_bytes: int = 4 * MiB
    #: Per background request timeout (Go: 120 s).
    background_timeout_sec: float = 120.0
    #: Worker threads for decode + verify + cache writes.
    decode_threads: int = 4
    #: ours (``wait_prefetch_on_check``): Check (containerd's create) waits for the
    #: layer's prefetch, as Go's does. Off: the container starts while the prefetch
    #: streams in; each read waits for its own chunks only.
    wait_prefetch_on_check: bool = _C.wait_prefetch_on_check
    #: Wait for the prefetch in Mount as well (Go waits only in Check).
    wait_prefetch_on_mount: bool = False
    #: ours (``head_start_max_bytes``): at most this many bytes of a prefetch start
    #: downloading while the TOC is parsed (`stargz.fs.headstart`; 0 = off, for A/B runs:
    #: bench_hellobench.py ``ours-opt-nohs``).
    head_start_max_bytes: int = _C.head_start_max_bytes
    #: ours (``head_start_streams``): a head start of up to 8 MiB is this many GETs of
    #: consecutive pieces at once (each streamed), not one.
    head_start_streams: int = _C.head_start_streams
    #: ours (``[fuse] read_ahead_next_chunk``): a sequential reader past the middle of a
    #: cached chunk has the next chunk's cache file read ahead (A/B: bench_read_ahead.py).
    read_ahead_next_chunk: bool = _C.fuse.read_ahead_next_chunk
    #: ours (``[fuse] splice``): a READ of at least 128 KiB whose bytes are in verified
    #: disk-cache files is answered by splicing the files' ranges into the FUSE device (no
    #: copy through Python; `stargz.fuse.session`). Off: read into memory and written, as
    #: before (A/B: bench_fs.py, bench_hello_readpath.py).
    splice: bool = _C.fuse.splice
    #: ours (``[fuse] busy_poll_us``): the FUSE session reads the device for up to this
    #: long before it sleeps, while requests come that quickly (`stargz.fuse.Session`).
    busy_poll_us: int = _C.fuse.busy_poll_us
    #: ours (``[blob] max_toc_bytes``): refuse a blob whose TOC region (TOC offset to the
    #: blob's end) is bigger, before fetching it (0 = no bound). Real TOCs are a few MiB;
    #: the Go estargz reader has no such bound.
    max_toc_bytes: int = _C.blob.max_toc_bytes
    #: ours (``resolve_neighbours``): a mount starts resolving the other layers its labels
    #: name and fetching their TOCs (`stargz.fs.neighbours`), ``resolve_neighbours_parallel``
    #: at a time; what a layer never mounted holds is released after ``neighbour_hold_sec``
    #: (upstream ``resolve_result_entry_ttl_sec``) and never exceeds
    #: ``resolve_neighbours_max_bytes``.
    resolve_neighbours: bool = _C.resolve_neighbours
    resolve_neighbours_parallel: int = _C.resolve_neighbours_parallel
    resolve_neighbours_max_bytes: int = _C.resolve_neighbours_max_bytes
    neighbour_hold_sec: float = float(_C.resolve_result_entry_ttl_sec)

    def __post_init__(self) -> None:
        if not (isinstance(self.passthrough, bool) or self.passthrough == "auto"):
            raise InvalidArgument(
                f'passthrough must be True, False or "auto", not {self.passthrough!r}'
            )

    @classmethod
    def from_config(cls, cfg: Config | None = None, **overrides: Any) -> FsOptions:
        """Options from a loaded `stargz.config.Config` (defaults without one)."""
        cfg = cfg or _C
        blob = BlobOptions.from_config(cfg.blob)
        dc, fuse = cfg.directory_cache, cfg.fuse
        values: dict[str, Any] = dict(
            prefetch_size=cfg.prefetch_size,
            prefetch_timeout_sec=float(cfg.prefetch_timeout_sec),
            prefetch_async_size=cfg.prefetch_async_size,
            wait_prefetch_on_check=cfg.wait_prefetch_on_check,
            noprefetch=cfg.noprefetch,
            no_background_fetch=cfg.no_background_fetch,
            allow_no_verification=cfg.allow_no_verification,
            disable_verification=cfg.disable_verification,
            max_concurrency=cfg.max_concurrency,
            log_file_access=cfg.log_file_access,
            head_start_max_bytes=cfg.head_start_max_bytes,
            head_start_streams=cfg.head_start_streams,
            chunk_size=blob.chunk_size,
            fetching_timeout_sec=float(blob.fetching_timeout_sec),
            prefetch_chunk_size=blob.prefetch_chunk_size,
            valid_interval=blob.check_interval,
            max_toc_bytes=cfg.blob.max_toc_bytes,
            resolve_neighbours=cfg.resolve_neighbours,
            resolve_neighbours_parallel=cfg.resolve_neighbours_parallel,
            resolve_neighbours_max_bytes=cfg.resolve_neighbours_max_bytes,
            neighbour_hold_sec=float(cfg.resolve_result_entry_ttl_sec),
            max_cache_fds=dc.max_cache_fds,
            sync_add=dc.sync_add,
            disk_cache_max_bytes=dc.max_size_bytes,
            memory_cache_bytes=dc.max_memory_bytes,
            attr_timeout=float(fuse.attr_timeout),
            entry_timeout=float(fuse.entry_timeout),
            read_ahead_kb=fuse.read_ahead_kb,
            notify_store=fuse.notify_store,
            passthrough=fuse.passthrough,
            read_ahead_next_chunk=fuse.read_ahead_next_chunk,
            splice=fuse.splice,
            busy_poll_us=fuse.busy_poll_us,
        )
        values.update(overrides)
        return cls(**values)
