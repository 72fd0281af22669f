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

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
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


# --- the daemon's production trace ------------------------------------------------------

#: Directory of trace files under the daemon root.
TRACE_DIR = "trace"
TRACE_SUFFIX = ".jsonl"


def trace_file_name(ref: str) -> str:
    """The file (under `TRACE_DIR`) holding the trace of image ``ref``."""
    return hashlib.sha256(ref.encode()).hexdigest()[:32] + TRACE_SUFFIX


class _Image:
    def __init__(self, ref: str, path: str, entries: list[dict[str, str]]) -> None:
        self.ref, self.path = ref, path
        self.entries = entries
        self.seen = {(e["layerDigest"], e["path"]) for e in entries}
        self.dirty = False


class ImageTracer:
    """Records, per image, the order in which containers first open files, during the
    first ``window_sec`` seconds after each of its layers is mounted.

    One JSON-lines file per image under ``<daemon root>/trace`` (0700; files 0600),
    each line ``{"path", "layerDigest", "ref"}`` (``path`` as the TOC names it). A trace
    already on disk is continued, not replaced: a second run adds what the first did not
    touch, at the end. Bounded: ``max_files`` lines per image, ``max_images`` files (the
    least recently updated goes first). Files are written (to a temp name, renamed) when
    a window ends and when the daemon stops, never from inside a FUSE request.
    """

    def __init__(
        self,
        directory: str,
        *,
        window_sec: float,
        max_files: int,
        max_images: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dir = directory
        self.window_sec = window_sec
        self.max_files = max_files
        self.max_images = max_images
        self._clock = clock
        self._windows: dict[str, list[tuple[str, float]]] = {}  # layer -> [(ref, end)]
        self._images: dict[str, _Image] = {}

    def mounted(self, layer: str, ref: str) -> None:
        """Layer ``layer`` of image ``ref`` was mounted: record its opens for a while."""
        now = self._clock()
        windows = [w for w in self._windows.get(layer, []) if w[1] > now and w[0] != ref]
        windows.append((ref, now + self.window_sec))
        self._windows[layer] = windows
        if ref not in self._images:
            path = os.path.join(self.dir, trace_file_name(ref))
            self._images[ref] = _Image(ref, path, [e for e in read_trace(path) if e["ref"] == ref])

    def opened(self, layer: str, path: str) -> None:
        windows = self._windows.get(layer)
        if not windows:
            return
        now = self._clock()
        for ref, end in windows:
            if now > end:
                continue
            img = self._images.get(ref)
            key = (layer, path)
            if img is None or key in img.seen or len(img.entries) >= self.max_files:
                continue
            img.seen.add(key)
            img.entries.append({"path": path, "layerDigest": layer, "ref": ref})
            img.dirty = True

    def flush(self) -> None:
        """Write every trace that changed; forget windows that ended."""
        now = self._clock()
        self._windows = {
            k: live for k, v in self._windows.items() if (live := [w for w in v if w[1] > now])
        }
        dirty = [img for img in self._images.values() if img.dirty]
        if not dirty:
            return
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)
        for img in dirty:
            data = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in img.entries)
            tmp = img.path + ".tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
            os.replace(tmp, img.path)
            img.dirty = False
        self._evict()

    def _evict(self) -> None:
        files = [
            os.path.join(self.dir, n) for n in os.listdir(self.dir) if n.endswith(TRACE_SUFFIX)
        ]
        if len(files) <= self.max_images:
            return
        files.sort(key=lambda p: os.stat(p).st_mtime)
        for p in files[: len(files) - self.max_images]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
            for ref, img in list(self._images.items()):
                if img.path == p:
                    del self._images[ref]


def read_trace(path: str) -> list[dict[str, str]]:
    """The entries of one trace file (missing file: none; bad lines are skipped)."""
    out: list[dict[str, str]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    e = json.loads(line)
                    if isinstance(e, dict) and all(
                        isinstance(e.get(k), str) for k in ("path", "layerDigest", "ref")
                    ):
                        out.append({k: e[k] for k in ("path", "layerDigest", "ref")})
    except FileNotFoundError:
        pass
    return out
