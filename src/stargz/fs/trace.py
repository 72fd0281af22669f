"""The order in which a workload first opens the files of each layer.

`stargz.fs.ops.Operations` calls ``on_open(layer digest, path)`` whenever a regular file
of a mounted layer is opened (every READ follows an OPEN, so the first open is the first
touch). :class:`AccessTrace` is that callback: it keeps, per layer, the paths in
first-open order, while it is recording. ``stargz optimize`` turns this into the
prioritized files of each layer; Go's ``ctr-remote i optimize`` gets the same list from
fanotify on the container's rootfs (regular files opened or read, no directories).

Paths are layer paths as the TOC names them (no leading slash). Because each layer is a
FUSE subtree of its own, the layer that answers an open is the one overlayfs chose: the
topmost layer that has the file.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Access:
    layer: str  # layer digest
    path: str
    #: Seconds since recording started.
    at: float


class AccessTrace:
    """First opens, per layer, in order. Thread-safe; never raises into a FUSE handler."""

    def __init__(self, *, recording: bool = True, limit: int = 1_000_000) -> None:
        self._lock = threading.Lock()
        self._seen: set[tuple[str, str]] = set()
        self._events: list[Access] = []
        self.limit = limit
        self.dropped = 0
        self._t0 = time.monotonic()
        self.recording = recording

    def start(self) -> None:
        """Record from now on (opens before this are not part of the workload)."""
        with self._lock:
            self._t0 = time.monotonic()
            self.recording = True

    def stop(self) -> None:
        self.recording = False

    def opened(self, layer: str, path: str) -> None:
        if not self.recording:
            return
        key = (layer, path)
        with self._lock:
            if key in self._seen:
                return
            if len(self._events) >= self.limit:
                self.dropped += 1
                return
            self._seen.add(key)
            self._events.append(Access(layer, path, time.monotonic() - self._t0))

    def events(self) -> list[Access]:
        """Every recorded first open, in order."""
        with self._lock:
            return list(self._events)

    def by_layer(self) -> dict[str, list[str]]:
        """Layer digest -> its paths in first-open order."""
        out: dict[str, list[str]] = {}
        for e in self.events():
            out.setdefault(e.layer, []).append(e.path)
        return out
