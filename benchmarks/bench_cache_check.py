"""First read of a cached chunk after a restart: the sha256 re-hash vs the xxh3 check.

A chunk file found in the disk cache at start is checked once before it is served. With a
checksum record (``user.stargz.xxh3``, written with the file) that is one xxh3-128 pass;
without one (a cache written before records existed, or a filesystem without user
xattrs) it is the sha256 re-hash against the chunkDigest. Both run side by side here, in
one run on the same files: the ``sha256`` arm removes the records from the chunk files
before the restart, so the product falls back to the re-hash, exactly as it did before
records existed.

Per chunk size (64 KiB, 1 MiB, 4 MiB): an eStargz layer of single-chunk files (random
bytes, one chunk each), fetched once; then for each arm and page-cache state (chunk files
dropped from the page cache with fadvise, or warm) the filesystem is restarted ``--rounds``
times (the arms interleaved, in alternating order) and every file is read for the first
time since that restart. Measured per file,
from the reading thread: the first 4 KiB (open + pread: the check is on this path) and the
whole file. Nothing is fetched after the first pass (checked: the source's request count).

    python -m benchmarks.bench_cache_check [--quick]

Needs root and /dev/fuse. Writes ``results/cache-check.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import random
import shutil
import sys
import tarfile
import tempfile
import threading
import time

from benchmarks import common
from benchmarks.common import percentile

SIZES = {"64KiB": 64 << 10, "1MiB": 1 << 20, "4MiB": 4 << 20}
#: Files per chunk size (one chunk each): about 64-128 MiB of cache per size.
FILES = {"64KiB": 400, "1MiB": 96, "4MiB": 32}
XATTR = "user.stargz.xxh3"


class Loop:
    """The filesystem's event loop in a thread; the benchmark reads from the main one."""

    def __init__(self) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def build_layer(work: str, size: int, n: int) -> dict:
    from stargz.estargz import build

    rnd = random.Random(size)
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(n):
            data = rnd.randbytes(size)
            ti = tarfile.TarInfo(f"f/{i:04d}")
            ti.size, ti.mode = len(data), 0o644
            tf.addfile(ti, io.BytesIO(data))
    tar.seek(0)
    blob = os.path.join(work, f"layer-{size}.esgz")
    with open(blob, "wb") as dst:
        res = build(tar, dst, level=1, chunk_size=size)
    return {"blob": blob, "digest": res.blob_digest, "toc_digest": res.toc_digest, "n": n}


def labels(spec: dict) -> dict:
    return {
        "containerd.io/snapshot/remote/stargz.reference": "bench/cache-check:1",
        "containerd.io/snapshot/remote/stargz.digest": spec["digest"],
        "containerd.io/snapshot/stargz/toc.digest": spec["toc_digest"],
    }


class Daemon:
    """One filesystem instance on ``root`` with the layer mounted at ``mp``."""

    def __init__(self, lp: Loop, root: str, mp: str, spec: dict, source) -> None:
        from stargz.fs import FsOptions, StargzFileSystem

        opts = FsOptions(
            no_background_fetch=True, noprefetch=True, passthrough=False, notify_store=False
        )
        self.lp = lp
        self.fs = StargzFileSystem(root, source, opts)
        lp.run(self.fs.start())
        lp.run(self.fs.mount(mp, labels(spec)))
        self.layer = self.fs.layer(spec["digest"])

    def close(self) -> None:
        self.lp.run(self.fs.close())


def chunk_files(layer) -> list[str]:
    idx = layer.index
    return [layer.disk.path(idx.keys[r]) for r in range(len(idx.keys))]


def fadvise(paths: list[str], advice: int) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, advice)
            if advice == os.POSIX_FADV_WILLNEED:
                while os.read(fd, 1 << 20):
                    pass
        finally:
            os.close(fd)


def first_reads(mp: str, n: int) -> tuple[list[float], list[float]]:
    first, whole = [], []
    for i in range(n):
        path = os.path.join(mp, "f", f"{i:04d}")
        t0 = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        try:
            os.pread(fd, 4096, 0)
            t1 = time.perf_counter()
            while os.read(fd, 1 << 20):
                pass
            t2 = time.perf_counter()
        finally:
            os.close(fd)
        first.append((t1 - t0) * 1e3)
        whole.append((t2 - t0) * 1e3)
    return first, whole


def stats(xs: list[float]) -> dict:
    return {
        "n": len(xs),
        "p50_ms": round(percentile(xs, 50), 4),
        "p99_ms": round(percentile(xs, 99), 4),
    }


def run_size(lp: Loop, work: str, label: str, rounds: int, quick: bool) -> dict:
    from stargz.fs import LocalLayerSource

    size = SIZES[label]
    n = FILES[label] // (4 if quick else 1)
    spec = build_layer(work, size, n)
    root = os.path.join(work, f"root-{label}")
    mp = os.path.join(work, f"mnt-{label}")
    os.makedirs(mp)
    source = LocalLayerSource(blobs={spec["digest"]: spec["blob"]})
    d = Daemon(lp, root, mp, spec, source)
    first_reads(mp, n)  # fetch everything once
    paths = chunk_files(d.layer)
    deadline = time.monotonic() + 60
    while not all(os.path.exists(p) for p in paths) and time.monotonic() < deadline:
        time.sleep(0.05)
    d.close()
    records = {p: os.getxattr(p, XATTR) for p in paths}
    requests = source.requests
    out: dict = {"files": n, "chunk_bytes": size}
    samples: dict[str, tuple[list[float], list[float]]] = {}
    for rnd in range(rounds):
        # arms interleaved, their order alternating: drift of a shared machine hits both
        for state in ("page_cache_dropped", "page_cache_warm"):
            for arm in ("sha256", "xxh3") if rnd % 2 == 0 else ("xxh3", "sha256"):
                for p, rec in records.items():
                    if arm == "sha256":
                        with contextlib.suppress(OSError):
                            os.removexattr(p, XATTR)  # as before records existed
                    else:
                        os.setxattr(p, XATTR, rec)
                fadvise(
                    paths,
                    os.POSIX_FADV_DONTNEED
                    if state == "page_cache_dropped"
                    else os.POSIX_FADV_WILLNEED,
                )
                d = Daemon(lp, root, mp, spec, source)
                f, w = first_reads(mp, n)
                m = d.layer.metrics
                assert m.disk_cache_rejects == 0 and m.on_demand_fetches == 0, m
                d.close()
                got = samples.setdefault(f"{arm}/{state}", ([], []))
                got[0].extend(f)
                got[1].extend(w)
    for name, (firsts, wholes) in sorted(samples.items()):
        out[name] = {"first_4k": stats(firsts), "whole_file": stats(wholes)}
        common.log(label, name, out[name])
    assert source.requests == requests, "a restart fetched from the source"
    shutil.rmtree(root, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="restarts per arm and state")
    ap.add_argument("--quick", action="store_true", help="a quarter of the files, 1 round")
    common.add_output_args(ap, "cache-check")
    a = ap.parse_args(argv)
    rounds = 1 if a.quick else a.rounds
    import xxhash

    data: dict = {
        "machine": common.machine(xxhash=xxhash.VERSION),
        "rounds": rounds,
        "hash_speed_gb_s": hash_speeds(),
        "sizes": {},
    }
    lp = Loop()
    work = tempfile.mkdtemp(prefix="stargz-bench-check-")
    try:
        for label in SIZES:
            data["sizes"][label] = run_size(lp, work, label, rounds, a.quick)
    finally:
        lp.stop()
        shutil.rmtree(work, ignore_errors=True)
    headline = {
        f"{label}/{arm}/{state}/first_4k_p50_ms": r[f"{arm}/{state}"]["first_4k"]["p50_ms"]
        for label, r in data["sizes"].items()
        for arm in ("sha256", "xxh3")
        for state in ("page_cache_dropped", "page_cache_warm")
    }
    path = common.save(a, data, headline)
    print(path)
    return 0


def hash_speeds() -> dict:
    """GB/s of xxh3-128 (the xxhash package) and sha256 (the native core) on 4 MiB."""
    import xxhash

    from stargz.estargz import codec

    buf = random.Random(0).randbytes(4 << 20)
    out = {}
    for name, fn in (("xxh3_128", xxhash.xxh3_128_digest), ("sha256", codec.sha256)):
        reps = 50
        t0 = time.perf_counter()
        for _ in range(reps):
            fn(buf)
        out[name] = round(len(buf) * reps / (time.perf_counter() - t0) / 1e9, 2)
    return out


if __name__ == "__main__":
    sys.exit(main())
