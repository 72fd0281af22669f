"""Choosing between a native module and its pure-Python twin (STYLE item 8).

The native module is used when it is built and ``STARGZ_NO_EXTENSIONS=1`` is not set.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def select(
    native_name: str, python: ModuleType
) -> tuple[ModuleType, ModuleType | None, str | None]:
    """(module to use, the native module or None, why the native one is not used or None)."""
    if os.environ.get("STARGZ_NO_EXTENSIONS") == "1":
        return python, None, "disabled by STARGZ_NO_EXTENSIONS=1"
    try:
        native = importlib.import_module(native_name)
    except ImportError as e:  # not built: fall back to the twin
        return python, None, f"{type(e).__name__}: {e}"
    return native, native, None
