from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("daemon", "layers", "refused")
    DAEMON_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    daemon: DaemonStatus
    layers: _containers.RepeatedCompositeFieldContainer[LayerStatus]
    refused: _containers.RepeatedCompositeFieldContainer[RefusedLayer]
    def __init__(self, daemon: _Optional[_Union[DaemonStatus, _Mapping]] = ..., layers: _Optional[_Iterable[_Union[LayerStatus, _Mapping]]] = ..., refused: _Optional[_Iterable[_Union[RefusedLayer, _Mapping]]] = ...) -> None: ...

class DaemonStatus(_message.Message):
    __slots__ = ("version", "pid", "root", "lazy", "uptime_seconds", "fallbacks")
    class FallbacksEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    LAZY_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    version: str
    pid: int
    root: str
    lazy: bool
    uptime_seconds: float
    fallbacks: _containers.ScalarMap[str, int]
    def __init__(self, version: _Optional[str] = ..., pid: _Optional[int] = ..., root: _Optional[str] = ..., lazy: _Optional[bool] = ..., uptime_seconds: _Optional[float] = ..., fallbacks: _Optional[_Mapping[str, int]] = ...) -> None: ...

class SnapshotMount(_message.Message):
    __slots__ = ("name", "mountpoint")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MOUNTPOINT_FIELD_NUMBER: _ClassVar[int]
    name: str
    mountpoint: str
    def __init__(self, name: _Optional[str] = ..., mountpoint: _Optional[str] = ...) -> None: ...

class LayerStatus(_message.Message):
    __slots__ = ("digest", "ref", "repository", "snapshots", "size", "fetched_size", "fetched_percent", "cache_hits", "cache_misses", "verification_failures", "read_errors", "last_error", "last_error_time", "prefetch_done", "fetch_requests", "fetched_bytes")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    REPOSITORY_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    FETCHED_SIZE_FIELD_NUMBER: _ClassVar[int]
    FETCHED_PERCENT_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    VERIFICATION_FAILURES_FIELD_NUMBER: _ClassVar[int]
    READ_ERRORS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_TIME_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_DONE_FIELD_NUMBER: _ClassVar[int]
    FETCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FETCHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    digest: str
    ref: str
    repository: str
    snapshots: _containers.RepeatedCompositeFieldContainer[SnapshotMount]
    size: int
    fetched_size: int
    fetched_percent: float
    cache_hits: int
    cache_misses: int
    verification_failures: int
    read_errors: int
    last_error: str
    last_error_time: float
    prefetch_done: bool
    fetch_requests: int
    fetched_bytes: int
    def __init__(self, digest: _Optional[str] = ..., ref: _Optional[str] = ..., repository: _Optional[str] = ..., snapshots: _Optional[_Iterable[_Union[SnapshotMount, _Mapping]]] = ..., size: _Optional[int] = ..., fetched_size: _Optional[int] = ..., fetched_percent: _Optional[float] = ..., cache_hits: _Optional[int] = ..., cache_misses: _Optional[int] = ..., verification_failures: _Optional[int] = ..., read_errors: _Optional[int] = ..., last_error: _Optional[str] = ..., last_error_time: _Optional[float] = ..., prefetch_done: _Optional[bool] = ..., fetch_requests: _Optional[int] = ..., fetched_bytes: _Optional[int] = ...) -> None: ...

class RefusedLayer(_message.Message):
    __slots__ = ("digest", "ref", "snapshot", "key", "reason", "reason_text", "error", "time", "count")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REASON_TEXT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    digest: str
    ref: str
    snapshot: str
    key: str
    reason: str
    reason_text: str
    error: str
    time: float
    count: int
    def __init__(self, digest: _Optional[str] = ..., ref: _Optional[str] = ..., snapshot: _Optional[str] = ..., key: _Optional[str] = ..., reason: _Optional[str] = ..., reason_text: _Optional[str] = ..., error: _Optional[str] = ..., time: _Optional[float] = ..., count: _Optional[int] = ...) -> None: ...
