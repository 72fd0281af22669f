"""Read path of the FUSE filesystem vs the same files on a plain directory and on overlayfs.

One run, same machine, same files: an eStargz layer built from this machine's files
(``/usr/lib/python3.11`` for many small files, plus one 64 MiB file of shared libraries),
served by our filesystem in its own process (uvloop, like the daemon), and the same tar
extracted to a directory (and that directory as an overlayfs lower dir).

Measured:

- fully fetched layer (disk cache warm, page cache dropped before each pass):
  4 KiB random reads, O_DIRECT and buffered (p50/p99, µs), sequential MB/s of the big
  file; ours by default (``[fuse] passthrough = "auto"``: the kernel reads the verified
  cache files itself where it offers FUSE passthrough) and with ``passthrough = false``
  (every read through the daemon, with the FUSE bdi's read_ahead_kb at ours and at the
  kernel default), the daemon splicing cache files into /dev/fuse and busy polling
  (``[fuse] splice``, ``busy_poll_us``: the defaults) or neither (the path before); and
  the daemon-bound sequential speed of those two (cache files in the page cache, only the
  FUSE file's pages dropped);
- first-byte latency of never-read files (fresh cache) with 0 and 10 ms of emulated
  per-request latency on the blob source, and bytes fetched vs bytes read;
- notify_store: reading prefetched files with and without pushing them into the page
  cache on open (time and FUSE read requests).

    python -m benchmarks.bench_fs [--quick]

Needs root and /dev/fuse. Writes ``results/fs.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

from benchmarks import common
from benchmarks.common import REPO, percentile

BIG = "big/libs.bin"
BIG_SIZE = 64 << 20
TREE = "/usr/lib/python3.11"


# --- the layer ---------------------------------------------------------------------------


def _big_payload(size: int) -> bytes:
    out = bytearray()
    libdir = "/usr/lib/x86_64-linux-gnu"
    for name in sorted(os.listdir(libdir)):
        p = os.path.join(libdir, name)
        if os.path.isfile(p) and not os.path.islink(p) and ".so" in name:
            with open(p, "rb") as f:
                out += f.read(size - len(out))
            if len(out) >= size:
                break
    while len(out) < size:  # not enough libraries: repeat what there is
        out += out[: size - len(out)]
    return bytes(out)


def build_layer(work: str, prioritized: list[str] | None = None, name: str = "layer") -> dict:
    """tar (python tree + big file) -> eStargz blob; also extract it to <work>/plain."""
    from stargz.estargz import build

    tar_path = os.path.join(work, "layer.tar")
    if not os.path.exists(tar_path):
        with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tf:
            tf.add(TREE, arcname=TREE.lstrip("/"), recursive=True)
            data = _big_payload(BIG_SIZE)
            ti = tarfile.TarInfo(BIG)
            ti.size, ti.mode = len(data), 0o644
            tf.addfile(ti, io.BytesIO(data))
        plain = os.path.join(work, "plain")
        os.makedirs(plain)
        with tarfile.open(tar_path) as tf:
            tf.extractall(plain, filter="fully_trusted")
    blob = os.path.join(work, f"{name}.esgz")
    with open(tar_path, "rb") as src, open(blob, "wb") as dst:
        res = build(src, dst, level=6, prioritized_files=prioritized)
    return {
        "blob": blob,
        "digest": res.blob_digest,
        "toc_digest": res.toc_digest,
        "size": res.blob_size,
        "uncompressed": res.uncompressed_size,
    }


# --- the filesystem, in its own process ----------------------------------------------------


async def _serve(a: argparse.Namespace) -> None:
    from stargz.fs import FsOptions, LocalLayerSource, StargzFileSystem

    spec = json.loads(a.serve)
    source = LocalLayerSource(blobs={spec["digest"]: spec["blob"]}, latency=spec.get("latency", 0))
    fs = StargzFileSystem(spec["root"], source, FsOptions(**spec.get("options", {})))
    await fs.start()
    labels = {
        "containerd.io/snapshot/remote/stargz.reference": "bench/layer:1",
        "containerd.io/snapshot/remote/stargz.digest": spec["digest"],
        "containerd.io/snapshot/stargz/toc.digest": spec["toc_digest"],
    }
    try:
        await fs.mount(spec["mountpoint"], labels)
        await fs.check(spec["mountpoint"], {})
        layer = fs.layer(spec["digest"])

        def reply(**kw: object) -> None:
            print(json.dumps(kw), flush=True)

        reply(ready=True, read_ahead_kb=fs.read_ahead_kb, fuse_dev=fs.fuse_dev)
        while True:
            line = (await asyncio.to_thread(sys.stdin.readline)).strip()
            if line in ("", "quit"):
                break
            if line == "metrics":
                reply(
                    layer=layer.metrics.as_dict(),
                    source_bytes=source.bytes_read,
                    source_requests=source.requests,
                    fs=fs.metrics.as_dict(),
                )
            elif line == "wait-fetched":
                while not layer.fully_fetched:
                    await asyncio.sleep(0.05)
                while layer.fetcher.inflight:
                    await asyncio.sleep(0.01)
                reply(fetched=True, seconds=layer.metrics.as_dict())
    finally:
        await fs.close()


class Server:
    def __init__(self, spec: dict) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_fs", "--serve", json.dumps(spec)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.ready = self._line()

    def _line(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fs server exited with {self.proc.wait()}")
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(10)


# --- measurements ------------------------------------------------------------------------


def drop_cache(path: str) -> None:
    """Drop the page cache: the whole machine's, since FADV_DONTNEED on a passthrough file
    leaves the backing cache file's pages (the ones its reads hit) cached."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def random_reads(path: str, n: int, *, direct: bool, seed: int = 1) -> dict:
    size = os.stat(path).st_size
    rng = random.Random(seed)
    offs = [rng.randrange(0, size // 4096) * 4096 for _ in range(n)]
    if not direct:
        drop_cache(path)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    buf = mmap.mmap(-1, 4096)
    lat = []
    try:
        for off in offs:
            t = time.perf_counter_ns()
            got = os.preadv(fd, [buf], off)
            lat.append((time.perf_counter_ns() - t) / 1000)
            assert got == 4096
    finally:
        os.close(fd)
    return {
        "n": n,
        "p50_us": round(percentile(lat, 50), 1),
        "p99_us": round(percentile(lat, 99), 1),
        "mean_us": round(statistics.fmean(lat), 1),
        "lat": lat,
    }


def sequential(path: str, repeats: int) -> dict:
    speeds = []
    for _ in range(repeats):
        drop_cache(path)
        t = time.perf_counter()
        n = 0
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                n += len(chunk)
        speeds.append(n / (time.perf_counter() - t) / 1e6)
    return {
        "mb_per_s_median": round(statistics.median(speeds), 1),
        "mb_per_s_all": [round(s, 1) for s in speeds],
    }


def sequential_daemon_bound(path: str) -> float:
    """MB/s of ``path`` read with the FUSE file's pages dropped but not the daemon's cache
    files' (read once before): what the daemon's answers cost, without the disk."""
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    t = time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            n += len(chunk)
    return n / (time.perf_counter() - t) / 1e6


def warm_passthrough(server: Server, path: str, timeout: float = 60.0) -> bool:
    """Read ``path`` once through the daemon and wait until an open of it passes through
    (a multi-chunk file is merged for passthrough after a wholly cached read ends). False
    where the kernel has no FUSE passthrough."""
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = server.ask("metrics")["fs"]["passthrough_opens"]
        with open(path, "rb"):
            pass
        if server.ask("metrics")["fs"]["passthrough_opens"] > before:
            return True
        time.sleep(0.2)
    return False


def set_ra(path: str, kb: int) -> int:
    dev = os.stat(path).st_dev
    p = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    with open(p) as f:
        old = int(f.read())
    with open(p, "w") as f:
        f.write(str(kb))
    return old


def small_files(root: str, k: int, seed: int = 2) -> list[str]:
    files = []
    for dp, _, fns in os.walk(os.path.join(root, TREE.lstrip("/"))):
        for fn in fns:
            p = os.path.join(dp, fn)
            if os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p) > 0:
                files.append(os.path.relpath(p, root))
    files.sort()
    return random.Random(seed).sample(files, min(k, len(files)))


# --- the run -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="fewer samples")
    common.add_output_args(ap, "fs")
    a = ap.parse_args(argv)
    if a.serve:
        import uvloop

        uvloop.run(_serve(a))
        return 0
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("bench_fs needs root and /dev/fuse", file=sys.stderr)
        return 2
    n_rand = 500 if a.quick else 3000
    reps = 2 if a.quick else 5
    work = tempfile.mkdtemp(prefix="bench-fs-", dir="/tmp")
    servers: list[Server] = []
    mounted: list[str] = []
    results: dict = {}
    try:
        t = time.perf_counter()
        layer = build_layer(work)
        results["layer"] = {k: layer[k] for k in ("size", "uncompressed")} | {
            "build_seconds": round(time.perf_counter() - t, 1),
            "big_file_bytes": BIG_SIZE,
            "tree": TREE,
            "compression": "gzip level 6, 4 MiB chunks",
        }
        plain = os.path.join(work, "plain")
        ovl = os.path.join(work, "ovl")
        empty = os.path.join(work, "empty")
        os.makedirs(ovl)
        os.makedirs(empty)
        # read-only overlay needs two lower dirs: the files, and an empty one below
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={plain}:{empty}", ovl],
            check=True,
        )
        mounted.append(ovl)

        def spec(name: str, **kw: object) -> dict:
            mp = os.path.join(work, f"mnt-{name}")
            os.makedirs(mp)
            root = os.path.join(work, f"root-{name}")
            return {"root": root, "mountpoint": mp, **layer, **kw}

        # 1. fully fetched layer: ours by default (passthrough "auto") and without
        # passthrough, each its own daemon
        full: dict = {}
        fetch_opts = {"no_background_fetch": False, "background_silence_sec": 0}
        full_servers = {}
        for name, pt, splice in (
            ("full", "auto", True),
            ("full-nopt", False, True),
            ("full-nopt-copy", False, False),
        ):
            opts = {**fetch_opts, "max_concurrency": 2, "passthrough": pt, "splice": splice}
            if not splice:  # the read path before splicing and busy polling
                opts["busy_poll_us"] = 0
            s = Server(spec(name, options=opts))
            servers.append(s)
            full_servers[name] = s
            t = time.perf_counter()
            s.ask("wait-fetched")
            full[f"background_fetch_seconds_{name}"] = round(time.perf_counter() - t, 2)
        mp = os.path.join(work, "mnt-full")
        mp_nopt = os.path.join(work, "mnt-full-nopt")
        mp_copy = os.path.join(work, "mnt-full-nopt-copy")
        full["passthrough"] = warm_passthrough(full_servers["full"], os.path.join(mp, BIG))
        ours = set_ra(mp_nopt, 128)
        set_ra(mp_nopt, ours)
        # contenders take turns, pass by pass, so a noisy neighbour hurts them alike
        targets = {
            "stargz_fuse": (mp, None),
            "stargz_fuse_no_passthrough": (mp_nopt, ours),
            "stargz_fuse_no_passthrough_copy": (mp_copy, None),
            "stargz_fuse_no_passthrough_read_ahead_128kb": (mp_nopt, 128),
            "plain_dir": (plain, None),
            "overlayfs": (ovl, None),
        }
        samples: dict[str, dict[str, list]] = {
            k: {"odirect": [], "buffered": [], "seq": [], "seq_daemon": []} for k in targets
        }
        per_pass = max(n_rand // reps, 100)
        for i in range(reps):
            for name, (base, ra) in targets.items():
                if ra is not None:
                    set_ra(mp_nopt, ra)
                big = os.path.join(base, BIG)
                if ra != 128:
                    samples[name]["odirect"] += random_reads(big, per_pass, direct=True, seed=i)[
                        "lat"
                    ]
                samples[name]["buffered"] += random_reads(big, per_pass, direct=False, seed=i)[
                    "lat"
                ]
                samples[name]["seq"] += sequential(big, 1)["mb_per_s_all"]
                if name in ("stargz_fuse_no_passthrough", "stargz_fuse_no_passthrough_copy"):
                    samples[name]["seq_daemon"].append(round(sequential_daemon_bound(big), 1))
        set_ra(mp_nopt, ours)
        for name, sm in samples.items():
            r = {}
            for kind in ("odirect", "buffered"):
                lat = sm[kind]
                if lat:
                    r[f"random_4k_{kind}" + ("_cold" if kind == "buffered" else "")] = {
                        "n": len(lat),
                        "p50_us": round(percentile(lat, 50), 1),
                        "p99_us": round(percentile(lat, 99), 1),
                        "mean_us": round(statistics.fmean(lat), 1),
                    }
            r["sequential"] = {
                "mb_per_s_median": round(statistics.median(sm["seq"]), 1),
                "mb_per_s_min": round(min(sm["seq"]), 1),
                "mb_per_s_all": sm["seq"],
            }
            if sm["seq_daemon"]:
                r["sequential_daemon_bound"] = {
                    "mb_per_s_median": round(statistics.median(sm["seq_daemon"]), 1),
                    "mb_per_s_min": round(min(sm["seq_daemon"]), 1),
                    "mb_per_s_all": sm["seq_daemon"],
                }
            full[name] = r
        full["read_ahead_kb_ours"] = ours
        ovl_r = full["overlayfs"]
        ours_targets = [k for k in targets if k.startswith("stargz_fuse") and "128kb" not in k]
        for name in ours_targets:
            r = full[name]
            full[f"ratios_{name}_over_overlayfs"] = {
                "sequential": round(
                    r["sequential"]["mb_per_s_median"] / ovl_r["sequential"]["mb_per_s_median"], 3
                ),
                "random_4k_odirect_p50": round(
                    r["random_4k_odirect"]["p50_us"] / ovl_r["random_4k_odirect"]["p50_us"], 3
                ),
                "random_4k_buffered_cold_p50": round(
                    r["random_4k_buffered_cold"]["p50_us"]
                    / ovl_r["random_4k_buffered_cold"]["p50_us"],
                    3,
                ),
            }
        for name, s in full_servers.items():
            full[f"server_metrics_{name}"] = s.ask("metrics")
            s.close()
            servers.remove(s)
        results["fully_fetched"] = full

        # 2. first byte of never-read files, and amplification
        first = {}
        for latency_ms in (0, 10):
            s = Server(
                spec(
                    f"cold{latency_ms}",
                    latency=latency_ms / 1000,
                    options={"no_background_fetch": True},
                )
            )
            servers.append(s)
            mp = os.path.join(work, f"mnt-cold{latency_ms}")
            files = small_files(plain, 40 if a.quick else 120)
            lat, read_bytes = [], 0
            for rel in files:
                t = time.perf_counter_ns()
                with open(os.path.join(mp, rel), "rb", buffering=0) as f:
                    b = f.read(1)
                lat.append((time.perf_counter_ns() - t) / 1e6)
                assert b
            before = s.ask("metrics")
            for rel in files:
                with open(os.path.join(mp, rel), "rb") as f:
                    read_bytes += len(f.read())
            after = s.ask("metrics")
            first[f"latency_{latency_ms}ms"] = {
                "files": len(files),
                "first_byte_ms_p50": round(percentile(lat, 50), 3),
                "first_byte_ms_p99": round(percentile(lat, 99), 3),
                "bytes_read_by_workload": read_bytes,
                "bytes_fetched": after["source_bytes"],
                "fetch_requests": after["source_requests"],
                "amplification": round(after["source_bytes"] / max(read_bytes, 1), 2),
                "fraction_of_blob_fetched": round(after["source_bytes"] / layer["size"], 4),
                "requests_after_first_bytes": after["source_requests"] - before["source_requests"],
            }
            s.close()
            servers.remove(s)
        results["first_byte"] = first

        # 3. notify_store on open, on a prefetched layer
        pre_files = small_files(plain, 300)
        dyn = os.path.join(TREE.lstrip("/"), "lib-dynload")
        libs = sorted(
            os.path.join(dyn, n)
            for n in os.listdir(os.path.join(plain, dyn))
            if n.endswith(".so") and os.path.join(dyn, n) not in pre_files
        )
        pl = build_layer(work, prioritized=pre_files + libs, name="prefetch")
        runs: dict[str, list[dict]] = {"off": [], "on": []}
        for trial in range(reps):
            for on in (False, True):
                name = f"ns{int(on)}-{trial}"
                mp = os.path.join(work, f"mnt-{name}")
                os.makedirs(mp)
                sp = {
                    "root": os.path.join(work, f"root-{name}"),
                    "mountpoint": mp,
                    **pl,
                    # notify_store is the daemon's way to serve a prefetched file; with
                    # passthrough the kernel would read the verified cache files itself
                    "options": {
                        "no_background_fetch": True,
                        "notify_store": on,
                        "passthrough": False,
                    },
                }
                s = Server(sp)  # returns once Check saw the prefetch finish
                servers.append(s)
                before = s.ask("metrics")
                t = time.perf_counter()
                total = 0
                for rel in pre_files:  # whole small files, read once (a container start)
                    with open(os.path.join(mp, rel), "rb") as f:
                        total += len(f.read())
                dt = time.perf_counter() - t
                mid = s.ask("metrics")
                # shared libraries touched at random 4 KiB pages (what mmap faults do)
                rng = random.Random(trial)
                buf = mmap.mmap(-1, 4096)
                t = time.perf_counter()
                for rel in libs:
                    p = os.path.join(mp, rel)
                    fd = os.open(p, os.O_RDONLY)
                    try:
                        pages = max(os.fstat(fd).st_size // 4096, 1)
                        for _ in range(16):
                            os.preadv(fd, [buf], rng.randrange(pages) * 4096)
                    finally:
                        os.close(fd)
                dt_libs = time.perf_counter() - t
                after = s.ask("metrics")
                runs["on" if on else "off"].append(
                    {
                        "ms": dt * 1000,
                        "reads": mid["layer"]["reads"] - before["layer"]["reads"],
                        "pushed": after["layer"]["notify_store_bytes"],
                        "fetches": after["source_requests"] - before["source_requests"],
                        "bytes": total,
                        "libs_ms": dt_libs * 1000,
                        "libs_reads": after["layer"]["reads"] - mid["layer"]["reads"],
                    }
                )
                s.close()
                servers.remove(s)
        ns = {
            k: {
                "files": len(pre_files),
                "bytes": v[0]["bytes"],
                "open_and_read_all_ms_median": round(statistics.median(x["ms"] for x in v), 2),
                "open_and_read_all_ms_all": [round(x["ms"], 1) for x in v],
                "fuse_read_requests": v[0]["reads"],
                "libs": len(libs),
                "libs_random_4k_reads": 16 * len(libs),
                "libs_ms_median": round(statistics.median(x["libs_ms"] for x in v), 2),
                "libs_ms_all": [round(x["libs_ms"], 1) for x in v],
                "libs_fuse_read_requests": v[0]["libs_reads"],
                "notify_store_bytes": v[0]["pushed"],
                "fetches_after_prefetch": max(x["fetches"] for x in v),
            }
            for k, v in runs.items()
        }
        results["notify_store"] = ns
    finally:
        for s in servers:
            s.close()
        for mp in mounted:
            subprocess.run(["umount", mp], check=False)
        shutil.rmtree(work, ignore_errors=True)

    doc = {
        "benchmark": "fs",
        "date": common.now_utc(),
        "machine": common.machine(),
        "params": {"random_reads": n_rand, "sequential_repeats": reps, "quick": a.quick},
        "results": results,
    }
    full = results["fully_fetched"]
    headline = {
        k: {
            "random_4k_odirect_p50_us": full[k].get("random_4k_odirect", {}).get("p50_us"),
            "random_4k_buffered_cold_p50_us": full[k]["random_4k_buffered_cold"]["p50_us"],
            "sequential_MB_s": full[k]["sequential"]["mb_per_s_median"],
            "sequential_daemon_bound_MB_s": full[k]
            .get("sequential_daemon_bound", {})
            .get("mb_per_s_median"),
        }
        for k in (
            "stargz_fuse",
            "stargz_fuse_no_passthrough",
            "stargz_fuse_no_passthrough_copy",
            "plain_dir",
            "overlayfs",
        )
    }
    headline["passthrough"] = full["passthrough"]
    headline["first_byte_ms_p50"] = {
        k: v["first_byte_ms_p50"] for k, v in results["first_byte"].items()
    }
    out = common.save(a, doc, headline)
    print(json.dumps(doc, indent=1))
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
