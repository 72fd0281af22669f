"""TOC index: chunk table and name table; native backend when built, else the twin.

The contract is documented in ``stargz.estargz._tocindex_py`` (the reference); both
backends expose the same ``ChunkTable`` and ``NameTable``.

``backend`` says which one is in use ("native" or "python"). Set ``STARGZ_NO_EXTENSIONS=1``
to force the twin. ``native`` and ``python`` are the two modules (``native`` is None when the
extension is not built or is disabled) so tests and benchmarks can run both.
"""

from __future__ import annotations

import os
from types import ModuleType

from stargz.estargz import _tocindex_py as python

native: ModuleType | None = None
#: Why the native module is not in use (None when it is).
native_error: str | None = None

if os.environ.get("STARGZ_NO_EXTENSIONS") == "1":
    native_error = "disabled by STARGZ_NO_EXTENSIONS=1"
else:
    try:
        from stargz.estargz import _tocindex as native
    except ImportError as e:  # not built: fall back to the twin
        native_error = f"{type(e).__name__}: {e}"

_impl: ModuleType = native if native is not None else python
backend: str = "native" if native is not None else "python"

ChunkTable = _impl.ChunkTable
NameTable = _impl.NameTable

__all__ = ["ChunkTable", "NameTable", "backend", "native", "native_error", "python"]
