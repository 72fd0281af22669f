"""The knobs of the filesystem, read from the daemon's `stargz.config.Config`.

Upstream keys (SPEC §3) keep their names and defaults. Keys that are ours (not in the Go
snapshotter) are marked "ours" below; `from_config` reads each with ``getattr`` so this
module works whether or not `stargz.config` declares them yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class FsOptions:
    # --- top level (upstream) ---
    prefetch_size: int = 0
    prefetch_timeout_sec: float = 10.0
    #: Prefetches larger than this do not hold up Check (0 = always wait).
    prefetch_async_size: int = 0
    noprefetch: bool = False
    no_background_fetch: bool = False
    allow_no_verification: bool = False
    disable_verification: bool = False
    #: Concurrent background-fetch tasks across all layers.
    max_concurrency: int = 2
    log_file_access: bool = False
    #: Seconds Mount waits for the source to resolve a layer (Go: 30 s, not configurable).
    resolve_timeout_sec: float = 30.0
    # --- [blob] (upstream) ---
    #: Fetch granularity: small on-demand fetches are widened to this many bytes.
    chunk_size: int = 50000
    #: Per-request timeout of a chunk fetch.
    fetching_timeout_sec: float = 300.0
    #: Largest single GET of a prefetch (0 = one request for the whole prefetch range).
    prefetch_chunk_size: int = 0
    #: Seconds between connectivity re-checks in Check (0 = always check).
    valid_interval: float = 60.0
    # --- [directory_cache] ---
    max_cache_fds: int = 10
    #: Resolve reads only once the chunk is on disk (upstream ``sync_add``).
    sync_add: bool = False
    #: ours (``[directory_cache] max_size_bytes``): disk cache bound; 0 = unbounded.
    disk_cache_max_bytes: int = 10 * GiB
    #: ours (``[directory_cache] max_memory_bytes``): memory LRU of decompressed chunks.
    memory_cache_bytes: int = 64 * MiB
    # --- [fuse] ---
    attr_timeout: float = 1.0
    entry_timeout: float = 1.0
    #: ours (``[fuse] read_ahead_kb``): set on the FUSE bdi after mounting (0 = leave as is).
    read_ahead_kb: int = 1024
    #: ours (``[fuse] notify_store``): push cached chunks into the page cache on open.
    notify_store: bool = True
    #: ``[fuse] passthrough``: the kernel reads verified single-chunk files straight from
    #: the disk cache (needs kernel >= 6.9 with CONFIG_FUSE_PASSTHROUGH and CAP_SYS_ADMIN;
    #: without them the daemon serves every read, as with false).
    passthrough: bool = False
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
    #: Wait for the prefetch in Mount as well as in Check (Go waits only in Check).
    wait_prefetch_on_mount: bool = False
    #: ours (``head_start_max_bytes``): at most this many bytes of a prefetch start
    #: downloading while the TOC is parsed (`stargz.fs.headstart`; 0 = off, for A/B runs:
    #: bench_hellobench.py ``ours-opt-nohs``).
    head_start_max_bytes: int = 64 * MiB
    #: ours (``[fuse] read_ahead_next_chunk``): a sequential reader past the middle of a
    #: cached chunk has the next chunk's cache file read ahead (A/B: bench_read_ahead.py).
    read_ahead_next_chunk: bool = True
    #: ours (``[blob] max_toc_bytes``): refuse a blob whose TOC region (TOC offset to the
    #: blob's end) is bigger, before fetching it (0 = no bound). Real TOCs are a few MiB;
    #: the Go estargz reader has no such bound, containers/storage stops at 50 MiB.
    max_toc_bytes: int = 64 * MiB

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> FsOptions:
        """Options from a `stargz.config.Config` (or anything shaped like it)."""

        def get(obj: Any, name: str, default: Any) -> Any:
            return getattr(obj, name, default) if obj is not None else default

        d = cls()
        blob = get(cfg, "blob", None)
        dc = get(cfg, "directory_cache", None)
        fuse = get(cfg, "fuse", None)
        interval = get(blob, "valid_interval", d.valid_interval)
        if get(blob, "check_always", False):
            interval = 0
        values = dict(
            prefetch_size=get(cfg, "prefetch_size", d.prefetch_size),
            prefetch_timeout_sec=get(cfg, "prefetch_timeout_sec", d.prefetch_timeout_sec),
            prefetch_async_size=get(cfg, "prefetch_async_size", d.prefetch_async_size),
            noprefetch=get(cfg, "noprefetch", d.noprefetch),
            no_background_fetch=get(cfg, "no_background_fetch", d.no_background_fetch),
            allow_no_verification=get(cfg, "allow_no_verification", d.allow_no_verification),
            disable_verification=get(cfg, "disable_verification", d.disable_verification),
            max_concurrency=get(cfg, "max_concurrency", d.max_concurrency),
            log_file_access=get(cfg, "log_file_access", d.log_file_access),
            chunk_size=get(blob, "chunk_size", d.chunk_size),
            fetching_timeout_sec=get(blob, "fetching_timeout_sec", d.fetching_timeout_sec),
            prefetch_chunk_size=get(blob, "prefetch_chunk_size", d.prefetch_chunk_size),
            valid_interval=interval,
            max_cache_fds=get(dc, "max_cache_fds", d.max_cache_fds),
            sync_add=get(dc, "sync_add", d.sync_add),
            disk_cache_max_bytes=get(dc, "max_size_bytes", d.disk_cache_max_bytes),
            memory_cache_bytes=get(dc, "max_memory_bytes", d.memory_cache_bytes),
            attr_timeout=get(fuse, "attr_timeout", d.attr_timeout),
            entry_timeout=get(fuse, "entry_timeout", d.entry_timeout),
            read_ahead_kb=get(fuse, "read_ahead_kb", d.read_ahead_kb),
            notify_store=get(fuse, "notify_store", d.notify_store),
            passthrough=get(fuse, "passthrough", d.passthrough),
            head_start_max_bytes=get(cfg, "head_start_max_bytes", d.head_start_max_bytes),
            read_ahead_next_chunk=get(fuse, "read_ahead_next_chunk", d.read_ahead_next_chunk),
            max_toc_bytes=get(blob, "max_toc_bytes", d.max_toc_bytes),
        )
        values.update(overrides)
        return cls(**values)
