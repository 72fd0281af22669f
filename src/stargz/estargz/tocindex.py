"""TOC index: chunk table and name table; native backend when built, else the twin.

The contract is documented in ``stargz.estargz._tocindex_py`` (the reference); both
backends expose the same ``ChunkTable`` and ``NameTable``.

``backend`` says which one is in use ("native" or "python"). Set ``STARGZ_NO_EXTENSIONS=1``
to force the twin. ``native`` and ``python`` are the two modules (``native`` is None when the
extension is not built or is disabled) so tests and benchmarks can run both.
"""

from __future__ import annotations

from types import ModuleType

from stargz.estargz import _tocindex_py as python
from stargz.estargz._backend import select

_impl: ModuleType
native: ModuleType | None
#: Why the native module is not in use (None when it is).
native_error: str | None
_impl, native, native_error = select("stargz.estargz._tocindex", python)
backend: str = "native" if native is not None else "python"

ChunkTable = _impl.ChunkTable
NameTable = _impl.NameTable

__all__ = ["ChunkTable", "NameTable", "backend", "native", "native_error", "python"]
