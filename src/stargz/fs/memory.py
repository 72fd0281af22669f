"""Hand freed heap memory back to the kernel after a burst (glibc ``malloc_trim``).

A layer open (the parsed TOC JSON) and a prefetch or background fetch (decoded chunks on
their way to the disk cache) allocate and free hundreds of MB, much of it from worker
threads' malloc arenas, which glibc does not shrink by itself: the daemon's RSS stayed
at its peak long after the burst. Calling ``malloc_trim(0)`` once the burst is over
returns those pages. Without glibc (another libc) this is a no-op.
"""

from __future__ import annotations

import ctypes

try:
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
    _malloc_trim.argtypes = [ctypes.c_size_t]
    _malloc_trim.restype = ctypes.c_int
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None


def trim() -> bool:
    """Release free heap pages to the kernel; True if any were released. Blocking (ms)."""
    return bool(_malloc_trim(0)) if _malloc_trim is not None else False
