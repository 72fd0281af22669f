"""Options of the registry client: the ``[blob]`` and ``[resolver]`` tables (SPEC §3).

Key names and defaults are upstream's. ``from_mapping`` takes a decoded TOML table (or
any dataclass with the same field names, such as ``stargz.config.BlobConfig``), so the
config loader can feed these without this package importing it.

Zero means "the default" for the ``[blob]`` numbers, as in Go's ``NewResolver``
(``fs/remote/resolver.go``): ``max_retries = 0`` is 5 retries, not none. ``check_always``
makes the connectivity check ignore ``valid_interval``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stargz.errors import InvalidArgument

DEFAULT_REQUEST_TIMEOUT_SEC = 30

_BLOB_DEFAULTS = {
    "valid_interval": 60,
    "chunk_size": 50000,
    "fetching_timeout_sec": 300,
    "max_retries": 5,
    "min_wait_msec": 30,
    "max_wait_msec": 300000,
}


def _as_mapping(value: Any, key: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return value
    raise InvalidArgument(f'"{key}" must be a table, not {type(value).__name__}')


def _check_keys(table: Mapping[str, Any], cls: type, key: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    for k in table:
        if k not in known:
            where = f"{key}.{k}" if key else k
            raise InvalidArgument(f'unknown key "{where}"')


def _typed(value: Any, tp: type, key: str) -> Any:
    # bool is an int in Python; TOML keeps them apart and so do we.
    if type(value) is not tp and not (tp is float and type(value) is int):
        raise InvalidArgument(f'"{key}" must be {tp.__name__}, not {type(value).__name__}')
    return value


@dataclass(frozen=True)
class BlobOptions:
    """``[blob]``: how layer blobs are fetched."""

    #: Seconds during which a successful connectivity check is not repeated.
    valid_interval: int = 60
    #: Check connectivity on every ``check()`` call (interval 0).
    check_always: bool = False
    #: Fetch granularity in bytes; single-range mode bridges gaps up to this size.
    chunk_size: int = 50000
    #: Deadline of one read (all its requests and retries), seconds.
    fetching_timeout_sec: int = 300
    #: Never send multi-range requests.
    force_single_range_mode: bool = False
    #: Maximum bytes per GET during prefetch (0: no limit).
    prefetch_chunk_size: int = 0
    #: Retries after the first attempt, for connection errors, 429 and 5xx.
    max_retries: int = 5
    #: Exponential backoff bounds, milliseconds.
    min_wait_msec: int = 30
    max_wait_msec: int = 300000

    def __post_init__(self) -> None:
        for name, default in _BLOB_DEFAULTS.items():
            value = getattr(self, name)
            if value < 0:
                raise InvalidArgument(f'"blob.{name}" must be >= 0, got {value}')
            if value == 0:
                object.__setattr__(self, name, default)
        if self.prefetch_chunk_size < 0:
            raise InvalidArgument('"blob.prefetch_chunk_size" must be >= 0')
        if self.min_wait_msec > self.max_wait_msec:
            raise InvalidArgument(
                f'"blob.min_wait_msec" ({self.min_wait_msec}) exceeds '
                f'"blob.max_wait_msec" ({self.max_wait_msec})'
            )

    @property
    def check_interval(self) -> float:
        """Seconds a successful check stays valid (0 with ``check_always``)."""
        return 0.0 if self.check_always else float(self.valid_interval)

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any] | Any | None) -> BlobOptions:
        m = _as_mapping(table, "blob")
        _check_keys(m, cls, "blob")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in m:
                tp = bool if f.type in ("bool", bool) else int
                kwargs[f.name] = _typed(m[f.name], tp, f"blob.{f.name}")
        return cls(**kwargs)


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

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any] | Any, key: str = "mirror") -> MirrorOptions:
        m = _as_mapping(table, key)
        _check_keys(m, cls, key)
        host = m.get("host", "")
        if not isinstance(host, str) or not host:
            raise InvalidArgument(f'"{key}.host" must be a non-empty string')
        header = []
        raw = m.get("header") or {}
        if isinstance(raw, tuple):  # already normalized
            raw = dict(raw)
        if not isinstance(raw, Mapping):
            raise InvalidArgument(f'"{key}.header" must be a table')
        for name, value in raw.items():
            values = [value] if isinstance(value, str) else value
            if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
                raise InvalidArgument(
                    f'"{key}.header.{name}" must be a string or a list of strings'
                )
            header.append((str(name), tuple(values)))
        return cls(
            host=host,
            insecure=_typed(m.get("insecure", False), bool, f"{key}.insecure"),
            request_timeout_sec=_typed(
                m.get("request_timeout_sec", 0), int, f"{key}.request_timeout_sec"
            ),
            header=tuple(header),
        )


@dataclass(frozen=True)
class HostOptions:
    """``[resolver.host."<registry>"]``: mirrors tried in order before the registry."""

    mirrors: tuple[MirrorOptions, ...] = ()

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any] | Any, key: str = "host") -> HostOptions:
        m = _as_mapping(table, key)
        _check_keys(m, cls, key)
        mirrors = m.get("mirrors") or ()
        if not isinstance(mirrors, list | tuple):
            raise InvalidArgument(f'"{key}.mirrors" must be an array of tables')
        return cls(
            mirrors=tuple(
                MirrorOptions.from_mapping(x, f"{key}.mirrors[{i}]") for i, x in enumerate(mirrors)
            )
        )


@dataclass(frozen=True)
class ResolverOptions:
    """``[resolver]``: registry hosts, mirrors and the default request timeout."""

    #: Default per-request timeout in seconds (used when a mirror says 0).
    request_timeout_sec: int = DEFAULT_REQUEST_TIMEOUT_SEC
    #: Registry host as written in image references ("docker.io") -> its mirrors.
    host: Mapping[str, HostOptions] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any] | Any | None) -> ResolverOptions:
        m = _as_mapping(table, "resolver")
        _check_keys(m, cls, "resolver")
        hosts = _as_mapping(m.get("host"), "resolver.host")
        return cls(
            request_timeout_sec=_typed(
                m.get("request_timeout_sec", DEFAULT_REQUEST_TIMEOUT_SEC),
                int,
                "resolver.request_timeout_sec",
            ),
            host={
                name: HostOptions.from_mapping(v, f'resolver.host."{name}"')
                for name, v in hosts.items()
            },
        )

    def default_timeout(self) -> float:
        """Seconds; like Go, a global value <= 0 means the built-in 30 s."""
        t = self.request_timeout_sec
        return float(t if t > 0 else DEFAULT_REQUEST_TIMEOUT_SEC)
