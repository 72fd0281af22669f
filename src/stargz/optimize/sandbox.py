"""The image's layers as a writable rootfs whose every file open is observed per layer.

Each layer is an eStargz blob mounted read-only through our FUSE filesystem
(`stargz.fs.StargzFileSystem` over a `LocalLayerSource`, served on an event loop in a
thread of this process); kernel overlayfs stacks them (top layer first) under a scratch
upper dir. The filesystem's ``on_open`` hook feeds an `AccessTrace`. `close` unmounts
everything (lazily if busy) and stops the loop, whatever happened before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from stargz import mountinfo
from stargz.errors import FailedPrecondition
from stargz.fs import FsOptions, LocalLayerSource, StargzFileSystem, mounts
from stargz.fs.source import STARGZ_DIGEST_LABEL, STARGZ_REFERENCE_LABEL, TOC_DIGEST_LABEL
from stargz.fs.trace import AccessTrace

log = logging.getLogger("stargz.optimize")
T = TypeVar("T")


@dataclass(frozen=True)
class LayerBlob:
    """An eStargz blob to mount: its digest, local path and TOC digest."""

    digest: str
    path: str
    toc_digest: str


class Sandbox:
    """Layers (bottom first) mounted under ``workdir``; ``rootfs`` is the merged tree."""

    def __init__(self, workdir: str, layers: list[LayerBlob]) -> None:
        self.workdir = os.path.abspath(workdir)
        self.layers = layers
        self.trace = AccessTrace(recording=False)
        self.rootfs = os.path.join(self.workdir, "rootfs")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="optimize-fs")
        self._thread.daemon = True
        self._fs: StargzFileSystem | None = None

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def open(self) -> None:
        """Mount every layer and the overlay (undo with `close`)."""
        self._thread.start()
        source = LocalLayerSource(blobs={lb.digest: lb.path for lb in self.layers})
        opts = FsOptions(no_background_fetch=True, noprefetch=True, passthrough=False)
        fs = StargzFileSystem(os.path.join(self.workdir, "fs"), source, opts)
        fs.ops.on_open = self.trace.opened
        self._fs = fs
        self._run(fs.start())
        lowers = []
        for i, lb in enumerate(self.layers):
            mp = os.path.join(self.workdir, "layers", str(i))
            os.makedirs(mp, exist_ok=True)
            labels = {
                STARGZ_REFERENCE_LABEL: "optimize.local/image:latest",
                STARGZ_DIGEST_LABEL: lb.digest,
                TOC_DIGEST_LABEL: lb.toc_digest,
            }
            self._run(fs.mount(mp, labels))
            lowers.append(mp)
        upper, work = (os.path.join(self.workdir, d) for d in ("upper", "work"))
        for d in (upper, work, self.rootfs):
            os.makedirs(d, exist_ok=True)
        # lowerdir lists the top layer first; a one-layer image still needs two lowers or
        # an upper dir, which it has
        opts_s = f"lowerdir={':'.join(reversed(lowers))},upperdir={upper},workdir={work}"
        proc = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts_s, self.rootfs],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise FailedPrecondition(f"overlay mount failed: {proc.stderr.strip()}")

    def close(self) -> None:
        """Unmount the overlay and the layers, stop the filesystem (never raises)."""
        for mp in mounts_under(self.workdir, skip=os.path.join(self.workdir, "fs")):
            try:
                mounts.unmount(mp)
            except OSError:
                with contextlib.suppress(OSError):
                    mounts.unmount(mp, mounts.MNT_DETACH)
        fs, self._fs = self._fs, None
        if fs is not None and self._thread.is_alive():
            try:
                self._run(fs.close(), 60)
            except Exception as e:  # the unmount below still runs
                log.warning("closing the filesystem failed: %s", e)
                if fs.fuse_dev is not None:
                    mounts.abort_connection(fs.fuse_dev)
        for mp in mounts_under(self.workdir):
            with contextlib.suppress(OSError):
                mounts.unmount(mp, mounts.MNT_DETACH)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> Sandbox:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mounts_under(path: str, skip: str | None = None) -> list[str]:
    """Mount points under ``path``, deepest first (``skip`` and what is under it left out)."""
    prefix = os.path.join(os.path.realpath(path), "")
    out = []
    for mp in set(mountinfo.mount_points()):
        if not os.path.join(mp, "").startswith(prefix):
            continue
        if skip and os.path.join(mp, "").startswith(os.path.join(skip, "")):
            continue
        out.append(mp)
    return sorted(out, key=lambda p: -p.count("/"))
