"""The many-files image: one layer of 1000 dirs x 100 files of 100 bytes (101k TOC entries).

Built once under ``/var/cache/stargz-bench/many-files/`` (``$STARGZ_BENCH_CACHE``): tag
``orig`` (gzip) and ``ours`` (``stargz convert``). Deterministic content and mtimes, so a
rebuild gives the same blobs. Used by the benchmarks that need a layer with a large TOC
(``bench_daemon_cost``, ``bench_load``).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from benchmarks.common import CACHE, log
from benchmarks.hellobench.images import has_tag, layers_of, pack_rootfs
from stargz.image.layout import Layout
from tests.harness.procs import run

MANY = CACHE / "many-files"
MANY_DIRS, MANY_FILES, MANY_SIZE = 1000, 100, 100


def build_many_files() -> Path:
    """OCI layout (tags ``orig``: gzip, ``ours``: ``stargz convert``) of one layer with
    MANY_DIRS x MANY_FILES files of MANY_SIZE bytes; deterministic content and mtimes."""
    lay = MANY / "oci"
    if has_tag(lay, "orig") and has_tag(lay, "ours"):
        return lay
    shutil.rmtree(MANY, ignore_errors=True)
    MANY.mkdir(parents=True)
    root = MANY / "rootfs"
    log(f"build many-files: {MANY_DIRS} x {MANY_FILES} files")
    for d in range(MANY_DIRS):
        dp = root / f"d{d:04d}"
        dp.mkdir(parents=True)
        for f in range(MANY_FILES):
            line = f"dir {d:04d} file {f:03d} "
            (dp / f"f{f:03d}.txt").write_text((line * (MANY_SIZE // len(line) + 1))[:MANY_SIZE])
            os.utime(dp / f"f{f:03d}.txt", (1_600_000_000, 1_600_000_000))
        os.utime(dp, (1_600_000_000, 1_600_000_000))
    os.utime(root, (1_600_000_000, 1_600_000_000))
    sizes = pack_rootfs(lay, "orig", root, ["/bin/sh"])
    shutil.rmtree(root)
    log(f"many-files orig: {sizes}; convert (ours)")
    run(
        [
            sys.executable,
            "-m",
            "stargz.cli.main",
            "convert",
            "-q",
            f"oci:{lay}:orig",
            f"oci:{lay}:ours",
        ],
        timeout=3600,
    )
    return lay


def toc_entries(layout: Path, tag: str) -> int:
    from stargz.estargz.reader import open_file

    n = 0
    lay = Layout(str(layout))
    for layer in layers_of(layout, tag):
        r = open_file(lay.blob_path(layer["digest"]), verify=False)
        try:
            n += len(r.toc.entries)
        finally:
            close = getattr(r, "close", None)
            if close:
                close()
    return n
