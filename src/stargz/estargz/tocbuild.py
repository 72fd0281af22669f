"""TOC builder: native backend when built, else the pure-Python twin.

The contract is documented in ``stargz.estargz._tocbuild_py`` (the reference). ``backend``
says which one is in use; ``native`` and ``python`` are the two modules (``native`` is None
when the extension is not built or is disabled by ``STARGZ_NO_EXTENSIONS=1``).
"""

from __future__ import annotations

from types import ModuleType

from stargz.estargz import _tocbuild_py as python
from stargz.estargz._backend import select

_impl: ModuleType
native: ModuleType | None
#: Why the native module is not in use (None when it is).
native_error: str | None
_impl, native, native_error = select("stargz.estargz._tocbuild", python)
backend: str = "native" if native is not None else "python"

build = _impl.build
#: ``build_json(data, *, payload_end, verify, max_chunk_size)``: `build` from the TOC JSON
#: bytes, the same result and errors as ``build(load_toc_doc(data)[1], ...)``.
build_json = _impl.build_json

__all__ = ["backend", "build", "build_json", "native", "native_error", "python"]
