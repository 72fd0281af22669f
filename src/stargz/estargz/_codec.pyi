"""Stub for the native chunk codec (src/_native/_codec.pyx); the contract is in _codec_py."""

from typing import Final

_Buffer = bytes | bytearray | memoryview

COMPRESSIONS: Final[tuple[str, ...]]
DEFAULT_MAX_TRAILING: Final[int]

def sha256(data: _Buffer) -> bytes: ...
def decode_chunk(
    src: _Buffer,
    compression: str,
    inner_offset: int,
    size: int,
    digest: bytes | None = None,
    exclusive: bool = True,
    *,
    max_trailing: int = ...,
) -> bytes: ...
