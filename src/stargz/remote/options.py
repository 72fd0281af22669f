"""Options of the registry client, built from the loaded configuration's ``[blob]`` and
``[resolver]`` tables (SPEC §3).

`stargz.config` owns the keys: their names, types, defaults and validation, once, at load
time. What is decided here is only what the values mean to the client. Zero means "the
default" for the ``[blob]`` numbers, as in Go's ``NewResolver`` (``fs/remote/resolver.go``):
``max_retries = 0`` is 5 retries, not none. ``check_always`` makes the connectivity check
ignore ``valid_interval``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from stargz.config import BlobConfig, HostConfig, MirrorConfig, ResolverConfig

_BLOB = BlobConfig()
DEFAULT_REQUEST_TIMEOUT_SEC = ResolverConfig().request_timeout_sec
#: ``[blob]`` numbers where 0 means the default.
_ZERO_IS_DEFAULT = (
    "valid_interval",
    "chunk_size",
    "fetching_timeout_sec",
    "max_retries",
    "min_wait_msec",
    "max_wait_msec",
)


@dataclass(frozen=True)
class BlobOptions:
    """``[blob]``: how layer blobs are fetched."""

    #: Seconds during which a successful connectivity check is not repeated.
    valid_interval: int = _BLOB.valid_interval
    #: Check connectivity on every ``check()`` call (interval 0).
    check_always: bool = _BLOB.check_always
    #: Fetch granularity in bytes; single-range mode bridges gaps up to this size.
    chunk_size: int = _BLOB.chunk_size
    #: Deadline of one read (all its requests and retries), seconds.
    fetching_timeout_sec: int = _BLOB.fetching_timeout_sec
    #: Never send multi-range requests.
    force_single_range_mode: bool = _BLOB.force_single_range_mode
    #: Maximum bytes per GET during prefetch (0: no limit).
    prefetch_chunk_size: int = _BLOB.prefetch_chunk_size
    #: Retries after the first attempt, for connection errors, 429 and 5xx.
    max_retries: int = _BLOB.max_retries
    #: Exponential backoff bounds, milliseconds.
    min_wait_msec: int = _BLOB.min_wait_msec
    max_wait_msec: int = _BLOB.max_wait_msec

    def __post_init__(self) -> None:
        for name in _ZERO_IS_DEFAULT:
            if getattr(self, name) == 0:
                object.__setattr__(self, name, getattr(_BLOB, name))

    @property
    def check_interval(self) -> float:
        """Seconds a successful check stays valid (0 with ``check_always``)."""
        return 0.0 if self.check_always else float(self.valid_interval)

    @classmethod
    def from_config(cls, cfg: BlobConfig | None) -> BlobOptions:
        cfg = cfg or _BLOB
        return cls(
            valid_interval=cfg.valid_interval,
            check_always=cfg.check_always,
            chunk_size=cfg.chunk_size,
            fetching_timeout_sec=cfg.fetching_timeout_sec,
            force_single_range_mode=cfg.force_single_range_mode,
            prefetch_chunk_size=cfg.prefetch_chunk_size,
            max_retries=cfg.max_retries,
            min_wait_msec=cfg.min_wait_msec,
            max_wait_msec=cfg.max_wait_msec,
        )


@dataclass(frozen=True)
class MirrorOptions:
    """One ``[[resolver.host."<registry>".mirrors]]`` entry (also used for the origin)."""

    host: str
    #: Plain http instead of https.
    insecure: bool = False
    #: Per-request timeout: 0 = the resolver's default, < 0 = none.
    request_timeout_sec: int = 0
    #: Extra request headers, each with one or more values. Never sent to redirect targets.
    header: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: PEM files of extra CAs this host's certificate may chain to (ours).
    ca: tuple[str, ...] = ()
    #: https without certificate verification (ours; ``insecure`` means plain http).
    skip_verify: bool = False

    @classmethod
    def from_config(cls, cfg: MirrorConfig) -> MirrorOptions:
        ca = (cfg.ca,) if isinstance(cfg.ca, str) else tuple(cfg.ca)
        return cls(
            host=cfg.host,
            insecure=cfg.insecure,
            request_timeout_sec=cfg.request_timeout_sec,
            header=tuple(
                (name, (value,) if isinstance(value, str) else tuple(value))
                for name, value in cfg.header.items()
            ),
            ca=tuple(p for p in ca if p),
            skip_verify=cfg.skip_verify,
        )


@dataclass(frozen=True)
class HostOptions:
    """``[resolver.host."<registry>"]``: mirrors tried in order before the registry."""

    mirrors: tuple[MirrorOptions, ...] = ()

    @classmethod
    def from_config(cls, cfg: HostConfig) -> HostOptions:
        return cls(mirrors=tuple(MirrorOptions.from_config(m) for m in cfg.mirrors))


@dataclass(frozen=True)
class ResolverOptions:
    """``[resolver]``: registry hosts, mirrors and the default request timeout."""

    #: Default per-request timeout in seconds (used when a mirror says 0).
    request_timeout_sec: int = DEFAULT_REQUEST_TIMEOUT_SEC
    #: Registry host as written in image references ("docker.io") -> its mirrors.
    host: Mapping[str, HostOptions] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: ResolverConfig | None) -> ResolverOptions:
        cfg = cfg or ResolverConfig()
        return cls(
            request_timeout_sec=cfg.request_timeout_sec,
            host={name: HostOptions.from_config(h) for name, h in cfg.host.items()},
        )

    def default_timeout(self) -> float:
        """Seconds; like Go, a global value <= 0 means the built-in 30 s."""
        t = self.request_timeout_sec
        return float(t if t > 0 else DEFAULT_REQUEST_TIMEOUT_SEC)
