"""Chunk decode and sha256: the native backend when built, else the pure-Python twin.

The contract is documented in ``stargz.estargz._codec_py`` (the reference); both backends
expose the same ``decode_chunk``, ``sha256``, ``COMPRESSIONS`` and ``DEFAULT_MAX_TRAILING``.

``backend`` says which one is in use ("native" or "python"). Set ``STARGZ_NO_EXTENSIONS=1``
to force the twin. ``native`` and ``python`` are the two modules (``native`` is None when the
extension is not built or is disabled) so tests and benchmarks can run both.
"""

from __future__ import annotations

from types import ModuleType

from stargz.estargz import _codec_py as python
from stargz.estargz._backend import select

_impl: ModuleType
native: ModuleType | None
#: Why the native module is not in use (None when it is).
native_error: str | None
_impl, native, native_error = select("stargz.estargz._codec", python)
backend: str = "native" if native is not None else "python"

COMPRESSIONS: tuple[str, ...] = _impl.COMPRESSIONS
DEFAULT_MAX_TRAILING: int = _impl.DEFAULT_MAX_TRAILING
decode_chunk = _impl.decode_chunk
sha256 = _impl.sha256

__all__ = [
    "COMPRESSIONS",
    "DEFAULT_MAX_TRAILING",
    "backend",
    "decode_chunk",
    "native",
    "native_error",
    "python",
    "sha256",
]
