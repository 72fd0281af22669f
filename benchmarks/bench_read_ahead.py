"""Sequential reads of large files through our FUSE mount, next-chunk read-ahead on vs off.

Each chunk of a layer is its own cache file, so the disk's read-ahead stops at every chunk
(4 MiB). `FsOptions.read_ahead_next_chunk` has the next chunk's file read ahead when a
sequential reader passes the middle of a chunk. This mounts the HelloBench python layer
(``ours-noopt``, from /var/cache/stargz-bench, built by bench_hellobench.py) in-process from
its OCI layout, reads every file once (all chunks cached), then times reading the 8 largest
files with 1 MiB reads after dropping the page cache, the two settings interleaved round by
round, straight through the FUSE mount and through a read-only overlayfs on top of it (as
containerd stacks it).

    python -m benchmarks.bench_read_ahead [--rounds 6]

Needs root. Writes ``results/read-ahead.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import uvloop

from stargz.fs import FsOptions, LocalLayerSource, StargzFileSystem
from stargz.fs.source import STARGZ_DIGEST_LABEL, STARGZ_REFERENCE_LABEL, TOC_DIGEST_LABEL

# isort: split
from benchmarks import common

OCI = common.CACHE / "oci" / "python"


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_all(paths: list[str]) -> int:
    n = 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while b := f.read(1 << 20):
                n += len(b)
    return n


def largest_layer(tag: str) -> dict:
    index = json.loads((OCI / "index.json").read_text())
    man = next(
        m
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    )
    manifest = json.loads((OCI / "blobs/sha256" / man["digest"].split(":")[1]).read_text())
    return max(manifest["layers"], key=lambda x: x["size"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    common.add_output_args(ap, "read-ahead")
    args = ap.parse_args(argv)
    layer = largest_layer("ours-noopt")
    labels = {
        STARGZ_REFERENCE_LABEL: "bench/python:ours-noopt",
        STARGZ_DIGEST_LABEL: layer["digest"],
        TOC_DIGEST_LABEL: layer["annotations"]["containerd.io/snapshot/stargz/toc.digest"],
    }
    loop = uvloop.new_event_loop()
    th = threading.Thread(target=loop.run_forever, daemon=True)
    th.start()

    def run(coro, timeout=600):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    base = Path(tempfile.mkdtemp(prefix="sgz-ra-"))
    mp, empty, ov = base / "mnt", base / "empty", base / "ov"
    for d in (mp, empty, ov):
        d.mkdir()

    async def make() -> StargzFileSystem:
        # the read-ahead is the daemon's: passthrough off, or the kernel reads merged copies
        opts = FsOptions(no_background_fetch=True, passthrough=False)
        fs = StargzFileSystem(str(base / "root"), LocalLayerSource(layouts=[OCI]), opts)
        await fs.start()
        return fs

    fs = run(make())
    stacked = False
    res: dict[str, list[float]] = {}
    try:
        run(fs.mount(str(mp), labels))
        files = []
        for d, _, names in os.walk(mp):
            for name in names:
                p = os.path.join(d, name)
                if os.path.isfile(p) and not os.path.islink(p):
                    files.append((os.path.getsize(p), p))
        read_all([p for _, p in files])  # every chunk into the disk cache
        time.sleep(2)  # let the cache writer finish
        big = [p for _, p in sorted(files)[-8:]]
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={mp}:{empty}", str(ov)],
            check=True,
        )
        stacked = True
        big_ov = [p.replace(str(mp), str(ov), 1) for p in big]
        for _ in range(args.rounds):
            for setting in ("on", "off"):
                # (the switch the option sets, flipped on the open layer between rounds)
                fs.layer(layer["digest"]).reads.read_ahead = setting == "on"
                for where, paths in (("fuse", big), ("overlay", big_ov)):
                    drop_caches()
                    t0 = time.perf_counter()
                    n = read_all(paths)
                    res.setdefault(f"{where}-{setting}", []).append(
                        n / (time.perf_counter() - t0) / 1e6
                    )
    finally:
        if stacked:
            subprocess.run(["umount", str(ov)], check=False)
        run(fs.close())
        loop.call_soon_threadsafe(loop.stop)
        th.join(5)
        shutil.rmtree(base, ignore_errors=True)
    out = {
        "benchmark": "read-ahead",
        "date": common.now_utc(),
        "machine": common.machine(),
        "method": "8 largest files of the python layer, 1 MiB reads, page cache dropped; "
        "next-chunk read-ahead on/off interleaved per round",
        "MB_s": {k: [round(x) for x in v] for k, v in res.items()},
        "median_MB_s": {k: round(statistics.median(v)) for k, v in res.items()},
    }
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=1))
    common.log(f"wrote {common.save(args, out, out['median_MB_s'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
