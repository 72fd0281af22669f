from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PullRequest(_message.Message):
    __slots__ = ("ref", "containerd_address", "namespace", "snapshotter", "plain_http", "username", "password", "platform")
    REF_FIELD_NUMBER: _ClassVar[int]
    CONTAINERD_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTTER_FIELD_NUMBER: _ClassVar[int]
    PLAIN_HTTP_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    ref: str
    containerd_address: str
    namespace: str
    snapshotter: str
    plain_http: bool
    username: str
    password: str
    platform: str
    def __init__(self, ref: _Optional[str] = ..., containerd_address: _Optional[str] = ..., namespace: _Optional[str] = ..., snapshotter: _Optional[str] = ..., plain_http: _Optional[bool] = ..., username: _Optional[str] = ..., password: _Optional[str] = ..., platform: _Optional[str] = ...) -> None: ...

class ImageResolved(_message.Message):
    __slots__ = ("ref", "digest", "media_type")
    REF_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    ref: str
    digest: str
    media_type: str
    def __init__(self, ref: _Optional[str] = ..., digest: _Optional[str] = ..., media_type: _Optional[str] = ...) -> None: ...

class ManifestChosen(_message.Message):
    __slots__ = ("digest", "layers")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    digest: str
    layers: int
    def __init__(self, digest: _Optional[str] = ..., layers: _Optional[int] = ...) -> None: ...

class LayerDone(_message.Message):
    __slots__ = ("index", "digest", "how", "fetched", "chain_id")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    HOW_FIELD_NUMBER: _ClassVar[int]
    FETCHED_FIELD_NUMBER: _ClassVar[int]
    CHAIN_ID_FIELD_NUMBER: _ClassVar[int]
    index: int
    digest: str
    how: str
    fetched: int
    chain_id: str
    def __init__(self, index: _Optional[int] = ..., digest: _Optional[str] = ..., how: _Optional[str] = ..., fetched: _Optional[int] = ..., chain_id: _Optional[str] = ...) -> None: ...

class PullDone(_message.Message):
    __slots__ = ("name", "chain_id", "seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHAIN_ID_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    chain_id: str
    seconds: float
    def __init__(self, name: _Optional[str] = ..., chain_id: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class PullEvent(_message.Message):
    __slots__ = ("resolved", "manifest", "layer", "done")
    RESOLVED_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    resolved: ImageResolved
    manifest: ManifestChosen
    layer: LayerDone
    done: PullDone
    def __init__(self, resolved: _Optional[_Union[ImageResolved, _Mapping]] = ..., manifest: _Optional[_Union[ManifestChosen, _Mapping]] = ..., layer: _Optional[_Union[LayerDone, _Mapping]] = ..., done: _Optional[_Union[PullDone, _Mapping]] = ...) -> None: ...
