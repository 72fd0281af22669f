"""Harness for the FUSE filesystem tests: a real FUSE mount served from a thread.

The filesystem runs on its own event loop (asyncio or uvloop) in a background thread, so
the test thread can use the mount with ordinary blocking syscalls. Teardown always
closes the filesystem, and then unmounts (lazily) everything still mounted under the
test's directory; if the loop thread is stuck, the FUSE connection is aborted first so no
syscall can hang the test run. Nothing is ever killed by name.

Requirements: root and ``/dev/fuse`` (a precise failure otherwise, never a silent skip),
kernel overlayfs for the stacking tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from stargz import mountinfo
from stargz.fs import FsOptions, LocalLayerSource, StargzFileSystem, mounts
from stargz.fs.source import (
    CRI_IMAGE_REF_LABEL,
    CRI_LAYER_DIGEST_LABEL,
    STARGZ_DIGEST_LABEL,
    STARGZ_REFERENCE_LABEL,
    TOC_DIGEST_LABEL,
)

T = TypeVar("T")
TMP_BASE = os.environ.get("STARGZ_TEST_TMP", "/tmp")


@pytest.fixture(scope="session")
def fuse_host() -> None:
    """Fail (not skip) with the exact reason when this host can't run FUSE tests."""
    if not os.path.exists("/dev/fuse"):
        pytest.fail(
            "/dev/fuse is missing: the FUSE tests need the fuse kernel module "
            "(modprobe fuse) and the device node (mknod /dev/fuse c 10 229)",
            pytrace=False,
        )
    if os.geteuid() != 0:
        pytest.fail(
            "the FUSE tests need root (allow_other, bind and overlay mounts)", pytrace=False
        )


class LoopThread:
    """An event loop running in a daemon thread; `run` executes a coroutine there."""

    def __init__(self, use_uvloop: bool = False) -> None:
        if use_uvloop:
            import uvloop

            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fs-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        if self.thread.is_alive():
            with contextlib.suppress(Exception):
                self.run(self.loop.shutdown_default_executor(), 10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


class FsEnv:
    """One test's filesystem(s): a base dir, a loop thread, and mount helpers."""

    def __init__(self, base: Path, use_uvloop: bool = False) -> None:
        self.base = base
        self.root = base / "root"
        self.lt = LoopThread(use_uvloop)
        self.fs: StargzFileSystem | None = None
        self._n = 0

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return self.lt.run(coro, timeout)

    def start(self, source: Any, **options: Any) -> StargzFileSystem:
        """A new StargzFileSystem on ``root`` (closing the previous one: a daemon restart)."""
        if self.fs is not None:
            self.close_fs()
        opts = FsOptions(**{"no_background_fetch": True, **options})

        async def make() -> StargzFileSystem:
            fs = StargzFileSystem(str(self.root), source, opts)
            await fs.start()
            return fs

        self.fs = self.run(make())
        return self.fs

    def close_fs(self, unmount: bool = True) -> None:
        fs, self.fs = self.fs, None
        if fs is not None:
            self.run(fs.close(unmount=unmount), 30)

    def mountpoint(self, name: str | None = None) -> Path:
        self._n += 1
        p = self.base / "mnt" / (name or f"m{self._n}")
        p.mkdir(parents=True, exist_ok=True)
        return p

    def mount(self, layer: Any, mp: Path | None = None, **label_kw: Any) -> Path:
        assert self.fs is not None
        mp = mp or self.mountpoint()
        self.run(self.fs.mount(str(mp), labels_for(layer, **label_kw)))
        return mp

    def teardown(self) -> None:
        fs = self.fs
        try:
            if fs is not None and self.lt.thread.is_alive():
                self.run(fs.close(), 30)
                self.fs = None
        except Exception:
            if fs is not None and fs.fuse_dev is not None:
                mounts.abort_connection(fs.fuse_dev)
            raise
        finally:
            for mp in _mounts_under(str(self.base)):
                with contextlib.suppress(OSError):
                    mounts.unmount(mp, mounts.MNT_DETACH)
            self.lt.stop()


def _mounts_under(path: str) -> list[str]:
    prefix = os.path.join(os.path.realpath(path), "")
    found = {mp for mp in mountinfo.mount_points() if os.path.join(mp, "").startswith(prefix)}
    return sorted(found, key=lambda p: -p.count("/"))


def corrupt_first_chunk(layer: Any, dest: Path, path: str) -> Path:
    """A copy of ``layer``'s blob at ``dest`` with one byte flipped in the middle of the
    compressed member of ``path``'s first chunk: that chunk fails its digest."""
    from stargz.estargz import open_file

    shutil.copyfile(layer.path, dest)
    with open_file(str(dest)) as r:
        start, end = r.chunk_span(r.chunk_rows(r.lookup(path).id, 0, 1)[0])
    with open(dest, "r+b") as f:
        f.seek((start + end) // 2)
        byte = f.read(1)
        f.seek((start + end) // 2)
        f.write(bytes([byte[0] ^ 0x55]))
    return dest


def labels_for(layer: Any, *, cri: bool = False, toc: bool = True, **extra: str) -> dict[str, str]:
    """Snapshot labels containerd (CRI set) or ctr-remote (stargz set) would pass."""
    if cri:
        labels = {
            CRI_IMAGE_REF_LABEL: "example.test/corners:esgz",
            CRI_LAYER_DIGEST_LABEL: layer.digest,
        }
    else:
        labels = {
            STARGZ_REFERENCE_LABEL: "example.test/corners:esgz",
            STARGZ_DIGEST_LABEL: layer.digest,
        }
    if toc and layer.toc_digest:
        labels[TOC_DIGEST_LABEL] = layer.toc_digest
    labels.update(extra)
    return labels


@pytest.fixture
def fs_env(fuse_host: None) -> Iterator[FsEnv]:
    base = Path(tempfile.mkdtemp(prefix="stargz-fs-", dir=TMP_BASE))
    env = FsEnv(base)
    try:
        yield env
    finally:
        try:
            env.teardown()
        finally:
            if not _mounts_under(str(base)):
                shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def uvloop_env(fuse_host: None) -> Iterator[FsEnv]:
    base = Path(tempfile.mkdtemp(prefix="stargz-fs-uv-", dir=TMP_BASE))
    env = FsEnv(base, use_uvloop=True)
    try:
        yield env
    finally:
        try:
            env.teardown()
        finally:
            if not _mounts_under(str(base)):
                shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def corners_source(corners) -> LocalLayerSource:
    return LocalLayerSource(layouts=[corners.root])


@pytest.fixture(scope="session")
def tree_listing(shared_dir: Path) -> Callable[[str], dict[str, Any]]:
    """``listing(root)`` from ``shared/tools/tree_listing.py`` (the ground truth's tool)."""
    path = shared_dir / "tools" / "tree_listing.py"
    if not path.is_file():
        pytest.fail(f"{path} is missing", pytrace=False)
    spec = importlib.util.spec_from_file_location("tree_listing", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.listing


@pytest.fixture(scope="session")
def merged_truth(fixtures_dir: Path) -> dict[str, Any]:
    return json.loads((fixtures_dir / "oci-corners.merged-tree.json").read_text())


@contextlib.contextmanager
def overlay(lowers: list[Path], target: Path) -> Iterator[Path]:
    """A read-only kernel overlayfs of ``lowers`` (top first), unmounted on exit."""
    import subprocess

    target.mkdir(parents=True, exist_ok=True)
    opts = "lowerdir=" + ":".join(str(p) for p in lowers)
    proc = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(target)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.fail(f"overlay mount failed: {proc.stderr.strip()}", pytrace=False)
    try:
        yield target
    finally:
        mounts.unmount_robust(str(target))
