"""The FUSE session alone: a trivial file system on `stargz.fuse` (one file of
zeros, answered from memory) and the round trip of one 4 KiB read through it.

This is the floor under every read our daemon serves: the kernel, the loop wake-up, our
request decoding and the reply. The reader runs in another process (no shared GIL), with
``O_DIRECT`` (every read reaches the daemon) and buffered after dropping the page cache.

    python -m benchmarks.bench_fuse_session [--reads 20000] [--loop uvloop|asyncio]

Needs root and /dev/fuse. Writes ``results/fuse-session.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import stat
import subprocess
import sys
import tempfile
import threading

from stargz.fuse import EntryAttributes, FileInfo, FUSEError, Session, StatvfsData, mount

# isort: split
from benchmarks import common

SIZE = 256 << 20
ZERO = bytes(1 << 20)

READER = r"""
import mmap, os, random, sys, time, json
path, direct, n = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
size = os.stat(path).st_size
rng = random.Random(1)
buf = mmap.mmap(-1, 4096)
fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
if not direct:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
lat = []
for _ in range(n):
    off = rng.randrange(size // 4096) * 4096
    t = time.perf_counter_ns()
    os.preadv(fd, [buf], off)
    lat.append((time.perf_counter_ns() - t) / 1000)
os.close(fd)
lat.sort()
print(json.dumps({"n": n, "p50_us": lat[n // 2], "p99_us": lat[int(n * 0.99)]}))
"""


class ZeroFS:
    """One read-only file ``f`` of SIZE zero bytes."""

    def _attr(self, ino: int) -> EntryAttributes:
        a = EntryAttributes()
        a.st_ino = ino
        if ino == 1:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2
        else:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o644, 1, SIZE
        a.attr_timeout = a.entry_timeout = 60.0
        return a

    def lookup(self, parent: int, name: bytes) -> EntryAttributes:
        if parent == 1 and name == b"f":
            return self._attr(2)
        raise FUSEError(errno.ENOENT)

    def getattr(self, ino: int) -> EntryAttributes:
        return self._attr(ino)

    def open(self, ino: int, flags: int) -> FileInfo:
        return FileInfo(ino, keep_cache=True)

    def release(self, fh: int) -> None:
        return None

    def read(self, fh: int, off: int, size: int) -> bytes:
        return ZERO[:size]

    def opendir(self, ino: int) -> int:
        return ino

    def readdir(self, fh: int, off: int, token: object) -> None:
        return None

    def statfs(self) -> StatvfsData:
        return StatvfsData()

    def getxattr(self, ino: int, name: bytes) -> bytes:
        raise FUSEError(errno.ENODATA)

    def listxattr(self, ino: int) -> list[bytes]:
        return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reads", type=int, default=20000)
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    common.add_output_args(ap, "fuse-session")
    args = ap.parse_args(argv)
    if args.loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    mp = tempfile.mkdtemp(prefix="sgz-fuse-bench-")
    session = Session(ZeroFS(), mount(mp))
    session.start(loop)
    th = threading.Thread(target=loop.run_forever, daemon=True)
    th.start()
    out: dict = {
        "benchmark": "fuse-session",
        "date": common.now_utc(),
        "machine": common.machine(),
        "loop": args.loop,
    }
    try:
        for name, direct in (("direct", "1"), ("buffered", "0")):
            res = subprocess.run(
                [sys.executable, "-c", READER, os.path.join(mp, "f"), direct, str(args.reads)],
                capture_output=True,
                text=True,
                check=True,
            )
            out[f"rand4k_{name}"] = json.loads(res.stdout)
    finally:
        loop.call_soon_threadsafe(session.close)
        th.join(0.5)
        loop.call_soon_threadsafe(loop.stop)
        th.join(5)
        os.rmdir(mp)
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=1))
    headline = {k: out[f"rand4k_{k}"]["p50_us"] for k in ("direct", "buffered")}
    common.log(f"wrote {common.save(args, out, headline)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
