"""The daemon's TOML configuration: every key of the Go snapshotter, same names, same defaults.

Sources merged from upstream (SPEC §3): ``fs/config/config.go``, ``service/config.go``,
``service/resolver/registry.go``, ``cmd/containerd-stargz-grpc/main.go``. Example::

    noprefetch = false
    max_concurrency = 2

    [blob]
    chunk_size = 50000

    [[resolver.host."docker.io".mirrors]]
    host = "mirror.example.com"
    header = { "x-token" = ["a", "b"] }

Validation is strict, and happens once at start: an unknown key, a value of the wrong type,
or an out-of-range value raises :class:`ConfigError`, whose message is one line naming the
key (``blob.chunk_size``). Note two upstream spellings kept on purpose: ``noprefetch`` (not
``no_prefetch``) and ``fetching_timeout_sec`` in ``[blob]``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stargz.errors import InvalidArgument

DEFAULT_CONFIG_PATH = "/etc/containerd-stargz-grpc/config.toml"

_INT64 = (-(1 << 63), (1 << 63) - 1)


class ConfigError(InvalidArgument):
    """A configuration problem, in one line; ``key`` is the dotted key ("" for the file)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _bad(key: str, problem: str) -> ConfigError:
    return ConfigError(key, f'key "{key}" {problem}')


def _nonneg(default: int) -> Any:
    return field(default=default, metadata={"min": 0})


@dataclass(frozen=True)
class BlobConfig:
    valid_interval: int = _nonneg(60)
    check_always: bool = False
    chunk_size: int = _nonneg(50000)
    fetching_timeout_sec: int = _nonneg(300)
    force_single_range_mode: bool = False
    prefetch_chunk_size: int = _nonneg(0)
    max_retries: int = _nonneg(5)
    min_wait_msec: int = _nonneg(30)
    max_wait_msec: int = _nonneg(300000)
    # ours: refuse a blob whose TOC region (TOC offset to the blob's end) is bigger, before
    # fetching it (0 = no bound); real TOCs are a few MiB
    max_toc_bytes: int = _nonneg(64 << 20)

    def __post_init__(self) -> None:
        # zero means the default for the wait bounds (as in Go's NewResolver)
        low = self.min_wait_msec or BlobConfig.min_wait_msec
        high = self.max_wait_msec or BlobConfig.max_wait_msec
        if low > high:
            raise _bad("blob.min_wait_msec", f"({low}) exceeds blob.max_wait_msec ({high})")


@dataclass(frozen=True)
class DirectoryCacheConfig:
    max_lru_cache_entry: int = _nonneg(10)
    max_cache_fds: int = _nonneg(10)
    sync_add: bool = False
    direct: bool = True
    fadv_dontneed: bool = False
    # ours (upstream has no size bound on its disk cache): bytes, 0 = unbounded
    max_size_bytes: int = _nonneg(10 << 30)
    max_memory_bytes: int = _nonneg(64 << 20)


@dataclass(frozen=True)
class FuseConfig:
    attr_timeout: int = _nonneg(1)
    entry_timeout: int = _nonneg(1)
    # upstream: a bool, false by default. Ours: "auto" by default (on where the kernel
    # offers FUSE passthrough and lets the daemon register backing files); true and false
    # mean what they mean upstream
    passthrough: bool | str = field(default="auto", metadata={"one_of": (True, False, "auto")})
    merge_buffer_size: int = _nonneg(419430400)
    merge_worker_count: int = _nonneg(10)
    # ours: the FUSE bdi read-ahead after mounting (0 = kernel default) and pushing
    # prefetched data into the page cache with notify_store
    read_ahead_kb: int = _nonneg(1024)
    notify_store: bool = True
    # ours: a sequential reader past the middle of a cached chunk has the next chunk's cache
    # file read ahead (each chunk is its own file, so the disk's read-ahead stops at its end)
    read_ahead_next_chunk: bool = True
    # ours: a READ answered from a verified disk-cache file is spliced from the file into
    # /dev/fuse (no copy through the daemon) where passthrough does not serve it
    splice: bool = True
    # ours: microseconds the FUSE session keeps reading the device for the next request
    # before it sleeps, while requests come that quickly (0 = never)
    busy_poll_us: int = _nonneg(200)


@dataclass(frozen=True)
class KubeconfigKeychainConfig:
    enable_keychain: bool = False
    kubeconfig_path: str = ""


@dataclass(frozen=True)
class CRIKeychainConfig:
    enable_keychain: bool = False
    image_service_path: str = "/run/containerd/containerd.sock"
    #: "" means: serve the CRI ImageService on the snapshotter's own socket.
    listen_path: str = ""


@dataclass(frozen=True)
class MirrorConfig:
    host: str = field(default="", metadata={"required": True})
    insecure: bool = False
    #: 0 = the resolver's default; < 0 = no timeout.
    request_timeout_sec: int = 0
    #: Extra request headers; each value is a string or a list of strings.
    header: dict[str, str | list[str]] = field(default_factory=dict)
    # ours (containerd's hosts.toml spelling): PEM files of CAs this host's certificate may
    # chain to, besides the system's; and skipping certificate verification altogether.
    # Upstream's ``insecure`` means plain http, not an unverified https.
    ca: str | list[str] = field(default_factory=list, metadata={"files": True})
    skip_verify: bool = False


@dataclass(frozen=True)
class HostConfig:
    mirrors: list[MirrorConfig] = field(default_factory=list)


@dataclass(frozen=True)
class ResolverConfig:
    request_timeout_sec: int = _nonneg(30)
    host: dict[str, HostConfig] = field(default_factory=dict)


@dataclass(frozen=True)
class SnapshotterConfig:
    allow_invalid_mounts_on_restart: bool = False


@dataclass(frozen=True)
class FuseManagerConfig:
    enable: bool = False
    address: str = "/run/containerd-stargz-grpc/fuse-manager.sock"
    #: "" means ``stargz-fuse-manager`` on PATH.
    path: str = ""
    metrics_address: str = ""


@dataclass(frozen=True)
class TraceConfig:
    """Ours: record which files running containers open first, per image (`stargz trace`,
    ``stargz optimize --from-trace``)."""

    enable: bool = False
    #: Opens of a layer's files are recorded for this long after the layer is mounted.
    window_sec: int = field(default=30, metadata={"min": 1})
    #: At most this many files per image; further opens are not recorded.
    max_files: int = field(default=10000, metadata={"min": 1})
    #: At most this many images keep a trace; the oldest trace goes first.
    max_images: int = field(default=100, metadata={"min": 1})


@dataclass(frozen=True)
class Config:
    metrics_address: str = ""
    no_prometheus: bool = False
    debug_address: str = ""
    ipfs: bool = False
    metadata_store: str = "memory"
    #: "memory", or anything else for the directory cache.
    http_cache_type: str = ""
    filesystem_cache_type: str = ""
    resolve_result_entry_ttl_sec: int = _nonneg(120)
    #: Deprecated upstream; accepted and ignored.
    resolve_result_entry: int = _nonneg(0)
    prefetch_size: int = _nonneg(0)
    prefetch_timeout_sec: int = _nonneg(10)
    prefetch_async_size: int = _nonneg(0)
    # ours: containerd's create (the Check of the container's lower layers) waits for their
    # prefetch, as Go's does (bounded by prefetch_timeout_sec, skipped above
    # prefetch_async_size). Off by default: a read waits only for its own chunks, which the
    # prefetch delivers as they arrive (or a read fetches ahead of it)
    wait_prefetch_on_check: bool = False
    noprefetch: bool = False
    no_background_fetch: bool = False
    debug: bool = False
    allow_no_verification: bool = False
    disable_verification: bool = False
    max_concurrency: int = _nonneg(2)
    log_file_access: bool = False
    # ours: at most this many bytes of a first-seen layer's prefetch start downloading while
    # its TOC is parsed (0 = off)
    head_start_max_bytes: int = _nonneg(64 << 20)
    # ours: that download (up to 8 MiB) is this many streamed GETs of consecutive pieces
    # at once: two ramp out of TCP slow start sooner than one (at 50 ms RTT, python and
    # nginx started 0.05 s sooner; the same at 20 ms)
    head_start_streams: int = field(default=2, metadata={"min": 1})
    # ours: a remote Prepare starts resolving the image's other layers (named in the
    # cri.image-layers / stargz.layers label) and fetching their TOCs, at most
    # resolve_neighbours_parallel at a time; TOCs fetched this way are held for
    # resolve_result_entry_ttl_sec, at most resolve_neighbours_max_bytes of them
    resolve_neighbours: bool = True
    resolve_neighbours_parallel: int = field(default=8, metadata={"min": 1})
    resolve_neighbours_max_bytes: int = _nonneg(64 << 20)
    # ours: once serving, import the registry client (aiohttp; ~0.13 s, ~11 MB) in the
    # background instead of on the first lazy mount, which would wait for it
    preload_registry_client: bool = True

    blob: BlobConfig = field(default_factory=BlobConfig)
    directory_cache: DirectoryCacheConfig = field(default_factory=DirectoryCacheConfig)
    fuse: FuseConfig = field(default_factory=FuseConfig)
    kubeconfig_keychain: KubeconfigKeychainConfig = field(default_factory=KubeconfigKeychainConfig)
    cri_keychain: CRIKeychainConfig = field(default_factory=CRIKeychainConfig)
    resolver: ResolverConfig = field(default_factory=ResolverConfig)
    snapshotter: SnapshotterConfig = field(default_factory=SnapshotterConfig)
    fuse_manager: FuseManagerConfig = field(default_factory=FuseManagerConfig)
    trace: TraceConfig = field(default_factory=TraceConfig)


_CHOICES = {"metadata_store": ("memory", "db")}
_ABSOLUTE = {"fuse_manager.address"}
#: TCP listen addresses (Go's ``net.Listen("tcp", ...)``); "" means off.
_TCP_ADDRESS = {"metrics_address", "fuse_manager.metrics_address"}
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


def split_tcp_address(address: str) -> tuple[str | None, int]:
    """``"host:port"`` -> ``(host, port)``, as Go's ``net.Listen("tcp", ...)`` reads it.

    The host is an IPv4 address, a bracketed IPv6 address (``[::1]:8234``, returned without
    brackets), a host name, or empty (``":8234"``: every interface, returned as None).
    Raises ValueError with the reason (a short phrase).
    """
    host, sep, port_text = address.rpartition(":")
    if not sep:
        raise ValueError("no port")
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError("the port is not a number")
    port = int(port_text)
    if port > 65535:
        raise ValueError("the port is out of range 0-65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError("invalid IPv6 address") from None
        return host[1:-1], port
    if ":" in host:
        raise ValueError("an IPv6 address needs brackets: [::1]:8234")
    if not host:
        return None, port
    if not _HOSTNAME.fullmatch(host):
        raise ValueError("invalid host name")
    return host, port


def _type_name(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _bad(key, f"must be a table, not {_type_name(value)}")
        return _build(tp, value, key)
    if origin is dict:
        _, vtype = typing.get_args(tp)
        if not isinstance(value, dict):
            raise _bad(key, f"must be a table, not {_type_name(value)}")
        return {k: _convert(vtype, v, f"{key}.{_quote_key(k)}") for k, v in value.items()}
    if origin is list:
        (etype,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise _bad(key, f"must be an array, not {_type_name(value)}")
        return [_convert(etype, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for alt in typing.get_args(tp):
            try:
                return _convert(alt, value, key)
            except ConfigError:
                continue
        names = " or ".join(_type_name(_example(a)) for a in typing.get_args(tp))
        raise _bad(key, f"must be {names}, not {_type_name(value)}")
    # bool is an int in Python; TOML keeps them apart and so do we.
    if type(value) is not tp:
        raise _bad(key, f"must be {_type_name(_example(tp))}, not {_type_name(value)}")
    if tp is int and not _INT64[0] <= value <= _INT64[1]:
        raise _bad(key, "does not fit in a 64-bit integer")
    return value


def _toml(value: object) -> str:
    """``value`` as it is written in TOML (for messages)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, int | float):
        return repr(value)
    return _type_name(value)


def _example(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    return {bool: False, int: 0, float: 0.0, str: "", list: [], dict: {}}.get(origin or tp, tp)


def _quote_key(k: str) -> str:
    bare = k and all(c.isascii() and (c.isalnum() or c in "-_") for c in k)
    return k if bare else '"' + k.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _build(cls: type, table: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in table.items():
        key = f"{prefix}.{_quote_key(k)}" if prefix else _quote_key(k)
        if k not in fields:
            raise ConfigError(key, f'unknown key "{key}"')
        one_of = fields[k].metadata.get("one_of")
        if one_of is not None and not any(type(v) is type(c) and v == c for c in one_of):
            names = ", ".join(_toml(c) for c in one_of[:-1]) + f" or {_toml(one_of[-1])}"
            raise _bad(key, f"must be {names}, got {_toml(v)}")
        value = _convert(hints[k], v, key)
        low = fields[k].metadata.get("min")
        if low is not None and value < low:
            raise _bad(key, f"must be >= {low}, got {value}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise _bad(key, f"must be one of {', '.join(_CHOICES[key])}, got {value!r}")
        if key in _ABSOLUTE and not os.path.isabs(value):
            raise _bad(key, f"must be an absolute path, got {value!r}")
        if fields[k].metadata.get("files"):
            for path in [value] if isinstance(value, str) else value:
                if not os.path.isfile(path):
                    raise _bad(key, f"names {path!r}, which is not a file")
        if key in _TCP_ADDRESS and value:
            try:
                split_tcp_address(value)
            except ValueError as e:
                raise _bad(
                    key, f'must be host:port like "127.0.0.1:8234" ({e}), got {value!r}'
                ) from None
        kwargs[k] = value
    for name, f in fields.items():
        if f.metadata.get("required") and not kwargs.get(name):
            key = f"{prefix}.{name}" if prefix else name
            raise _bad(key, "must be set to a non-empty value")
    return cls(**kwargs)


def parse(table: Mapping[str, Any]) -> Config:
    """Validate a decoded TOML document."""
    return _build(Config, table, "")


def loads(text: str) -> Config:
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"invalid TOML: {e}") from None
    return parse(table)


def load(path: str = DEFAULT_CONFIG_PATH, *, missing_ok: bool | None = None) -> Config:
    """Read ``path``. A missing file means defaults when it is the default path (or when
    ``missing_ok``), as upstream does; a missing file that was asked for is an error."""
    if missing_ok is None:
        missing_ok = path == DEFAULT_CONFIG_PATH
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        if missing_ok:
            return Config()
        raise ConfigError("", f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError("", f"{path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("", f"{path}: not UTF-8: {e}") from None
    try:
        return loads(text)
    except ConfigError as e:
        raise ConfigError(e.key, f"{path}: {e}") from None
