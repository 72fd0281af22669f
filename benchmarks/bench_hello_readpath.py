"""Read path side by side on the HelloBench python image: ours vs Go vs overlayfs.

Run after bench_hellobench.py has built the images (/var/cache/stargz-bench/oci/python).
One registry on 127.0.0.1 behind ../shared/tools/netem for the first-byte part only.
For each contender (its own fresh daemon + containerd; overlayfs = ``ctr i pull``):

1. first byte of never-read files: prefetch and background fetch off, emulated network on;
   open + read(1) of N files picked at random (16 KiB-4 MiB), p50/p99;
2. full fetch: read every regular file once (through the network), then network off;
3. sequential: page cache dropped, every regular file read with 1 MiB reads: MB/s (a
   metadata-bound walk: ~6.6k files); then the 8 largest files alone (``sequential_big``);
4. 4 KiB random preads on the 8 largest files, page cache dropped first: buffered and
   O_DIRECT p50/p99 (O_DIRECT may be refused by a FUSE mount: recorded as an error);
   then O_DIRECT again with every page cached (``rand4k_direct_hot``): the file system's
   own cost without the disk;
5. daemon RSS after mount and after the full fetch, CPU seconds for the full fetch.

    python -m benchmarks.bench_hello_readpath [--trials 3] [--net 5:200mbit]

Writes ``results/hellobench-readpath.json`` (progress in ``.partial.json`` while it runs).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import mmap
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import CACHE, log, percentile, proc_usage
from benchmarks.peer import GO_BIN, NO_FETCH, GoDaemon, netem
from tests.harness.procs import (
    Containerd,
    Registry,
    StargzDaemon,
    make_tempdir,
    mounted_image,
    run,
)

#: ours' ``[fuse]`` per contender: "ours" is the default ("auto": passthrough where the
#: kernel offers it); without passthrough every READ reaches the daemon, which answers a
#: disk-cache hit by splicing the cache file into /dev/fuse (``splice``) and polls the
#: device for the next request before sleeping (``busy_poll_us``), both by default;
#: "ours-nopt-copy" is the path before either (bytes read and written, no polling).
FUSE_CONFIG = {
    "ours": "",
    "ours-pt": "[fuse]\npassthrough = true\n",
    "ours-nopt": "[fuse]\npassthrough = false\n",
    "ours-nopt-nopoll": "[fuse]\npassthrough = false\nbusy_poll_us = 0\n",
    "ours-nopt-copy": "[fuse]\npassthrough = false\nsplice = false\nbusy_poll_us = 0\n",
}
CONTENDERS = (
    "ours",
    "ours-pt",
    "ours-nopt",
    "ours-nopt-nopoll",
    "ours-nopt-copy",
    "go",
    "overlayfs",
)
#: Passes of the sequential read of the 8 largest files (~27 MB) per trial.
SEQ_BIG_PASSES = 5


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def regular_files(root: Path) -> list[tuple[str, int]]:
    out = []
    for dp, _dns, fns in os.walk(root):
        for fn in fns:
            p = os.path.join(dp, fn)
            st = os.lstat(p)
            if (st.st_mode & 0o170000) == 0o100000:
                out.append((p, st.st_size))
    return sorted(out)


def read_all(files: list[tuple[str, int]]) -> int:
    n = 0
    for p, _ in files:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                n += len(chunk)
    return n


def q(xs: list[float], p: float) -> float:
    """Percentile ``p`` given as a fraction (0.5, 0.99)."""
    return percentile(xs, p * 100)


def rand_reads(paths: list[tuple[str, int]], n: int, direct: bool, rng: random.Random) -> dict:
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    buf = mmap.mmap(-1, 4096)
    lat = []
    fds = []
    try:
        for p, _ in paths:
            fds.append(os.open(p, flags))
        for _ in range(n):
            i = rng.randrange(len(paths))
            off = rng.randrange(max(1, paths[i][1] // 4096)) * 4096
            t0 = time.perf_counter()
            os.preadv(fds[i], [buf], off)
            lat.append(time.perf_counter() - t0)
    except OSError as e:
        return {"error": repr(e)}
    finally:
        for fd in fds:
            os.close(fd)
    return {"n": n, "p50_us": q(lat, 0.5) * 1e6, "p99_us": q(lat, 0.99) * 1e6}


def one(
    contender: str, reg: Registry, refs: dict, delay: float, rate: str, go_bin: str, seed: int
) -> dict:
    rng = random.Random(seed)
    snap = None
    dummy = make_tempdir("sgz-dummy-")
    res: dict = {"contender": contender}
    try:
        if contender in FUSE_CONFIG:
            cfg = NO_FETCH + FUSE_CONFIG[contender]
            snap = StargzDaemon.start(make_tempdir("sgz-rp-"), config_text=cfg, log_level="info")
        elif contender == "go":
            snap = GoDaemon.start(go_bin, reg.host, extra_toml=NO_FETCH)
        cd = Containerd.start(snap.address if snap else str(dummy / "none.sock"))
        try:
            ref = refs[contender]
            a = ["-a", cd.address, "-n", "rp"]
            netem("on", reg.port, delay, rate)
            try:
                if contender == "overlayfs":
                    run(["ctr", *a, "i", "pull", "--plain-http", ref], timeout=1800)
                else:
                    run(["ctr-remote", *a, "i", "rpull", "--plain-http", ref], timeout=1800)
                with mounted_image(
                    cd, ref, "rp", "overlayfs" if contender == "overlayfs" else "stargz"
                ) as root:
                    files = regular_files(root)
                    if snap:
                        res["rss_after_mount_bytes"] = proc_usage(snap.pid).get("rss_bytes")
                    cands = [f for f in files if 16384 <= f[1] <= 4 << 20]
                    pick = rng.sample(cands, min(30, len(cands)))
                    fb = []
                    for p, _ in pick:
                        t0 = time.perf_counter()
                        with open(p, "rb", buffering=0) as f:
                            f.read(1)
                        fb.append(time.perf_counter() - t0)
                    res["first_byte_ms"] = {
                        "n": len(fb),
                        "p50": q(fb, 0.5) * 1e3,
                        "p99": q(fb, 0.99) * 1e3,
                    }
                    u0 = proc_usage(snap.pid) if snap else {}
                    t0 = time.perf_counter()
                    nbytes = read_all(files)
                    res["full_fetch"] = {"bytes": nbytes, "s": time.perf_counter() - t0}
                    if snap:
                        u1 = proc_usage(snap.pid)
                        res["full_fetch"]["daemon_cpu_s"] = u1["cpu_s"] - u0["cpu_s"]
                        res["rss_after_full_fetch_bytes"] = u1["rss_bytes"]
                    netem("off", reg.port)
                    drop_caches()
                    t0 = time.perf_counter()
                    nbytes = read_all(files)
                    dt = time.perf_counter() - t0
                    res["sequential"] = {"bytes": nbytes, "s": dt, "MB_s": nbytes / dt / 1e6}
                    big = sorted(files, key=lambda f: -f[1])[:8]
                    speeds = []
                    for _ in range(SEQ_BIG_PASSES):
                        drop_caches()
                        t0 = time.perf_counter()
                        nbytes = read_all(big)
                        speeds.append(nbytes / (time.perf_counter() - t0) / 1e6)
                    res["sequential_big"] = {
                        "bytes": nbytes,
                        "MB_s": statistics.median(speeds),
                        "MB_s_all": speeds,
                    }
                    drop_caches()
                    res["rand4k_buffered"] = rand_reads(big, 2000, False, rng)
                    drop_caches()
                    res["rand4k_direct"] = rand_reads(big, 2000, True, rng)
                    # the same with every page cached (the daemon's cache files too): the
                    # file system's own cost, without the disk
                    read_all(big)
                    res["rand4k_direct_hot"] = rand_reads(big, 2000, True, rng)
                    res["files"] = len(files)
            finally:
                netem("off", reg.port)
        finally:
            cd.close()
    finally:
        if snap:
            snap.close()
        shutil.rmtree(dummy, ignore_errors=True)
    return res


def headline(summ: dict) -> dict:
    """Per contender: 4 KiB random read p50 (buffered, O_DIRECT, hot), sequential MB/s."""
    keys = (
        "rand4k_buffered_p50_us",
        "rand4k_direct_p50_us",
        "rand4k_direct_hot_p50_us",
        "sequential_big_MB_s",
        "sequential_MB_s",
        "first_byte_p50_ms",
    )
    return {c: {k: round(v[k], 1) for k in keys if v.get(k) is not None} for c, v in summ.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", default="python")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--net", default="5:200mbit")
    ap.add_argument("--go-bin", default=GO_BIN)
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    common.add_output_args(ap, "hellobench-readpath")
    args = ap.parse_args(argv)
    delay, rate = args.net.split(":")
    now = _dt.datetime.now(_dt.UTC)
    d = CACHE / "oci" / args.image
    doc: dict = {
        "benchmark": "hellobench-readpath",
        "date": now.isoformat(timespec="seconds"),
        "machine": common.machine(),
        "image": args.image,
        "network_for_first_byte": {"one_way_delay_ms": float(delay), "rate": rate},
        "notes": [
            "prefetch and background fetch off in both daemons",
            "ours-pt: ours with [fuse] passthrough = true (kernel FUSE passthrough)",
            "ours-nopt: passthrough = false (READs spliced from cache files, busy polling)",
            "ours-nopt-nopoll: same with busy_poll_us = 0",
            "ours-nopt-copy: passthrough = false, splice = false, busy_poll_us = 0 (before)",
            f"sequential_big: median of {SEQ_BIG_PASSES} passes per trial, caches dropped",
            "eStargz forms: ours = stargz convert (noopt), Go = ctr-remote convert (noopt)",
        ],
        "trials": [],
    }
    rng = random.Random(int(now.timestamp()))
    with Registry.start(make_tempdir("sgz-rpreg-"), access_log=True) as reg:
        refs = {
            "ours": reg.push_oci(d, "ours-noopt", f"rp-{args.image}:ours-noopt"),
            "go": reg.push_oci(d, "go-noopt", f"rp-{args.image}:go-noopt"),
            "overlayfs": reg.push_oci(d, "orig", f"rp-{args.image}:orig"),
        }
        for c in FUSE_CONFIG:
            refs[c] = refs["ours"]
        for r in range(args.trials):
            order = [c for c in CONTENDERS if c in args.contenders.split(",")]
            rng.shuffle(order)
            for c in order:
                try:
                    t = one(c, reg, refs, float(delay), rate, args.go_bin, seed=r)
                except Exception as e:
                    t = {"contender": c, "error": repr(e)[-2000:]}
                t["round"] = r
                doc["trials"].append(t)
                log(json.dumps(t)[:600])
                common.checkpoint(args, doc)
    summ: dict = {}
    for c in CONTENDERS:
        ts = [t for t in doc["trials"] if t["contender"] == c and "error" not in t]
        if not ts:
            continue

        def med(f, ts=ts):
            xs = [f(t) for t in ts]
            xs = [x for x in xs if x is not None]
            return statistics.median(xs) if xs else None

        summ[c] = {
            "n": len(ts),
            "first_byte_p50_ms": med(lambda t: t["first_byte_ms"]["p50"]),
            "first_byte_p99_ms": med(lambda t: t["first_byte_ms"]["p99"]),
            "sequential_MB_s": med(lambda t: t["sequential"]["MB_s"]),
            "sequential_big_MB_s": med(lambda t: t.get("sequential_big", {}).get("MB_s")),
            # the slowest pass of all trials (each pass is ~27 MB: tens of ms)
            "sequential_big_MB_s_min": min(
                (x for t in ts for x in t.get("sequential_big", {}).get("MB_s_all", [])),
                default=None,
            ),
            "rand4k_buffered_p50_us": med(lambda t: t["rand4k_buffered"].get("p50_us")),
            "rand4k_buffered_p99_us": med(lambda t: t["rand4k_buffered"].get("p99_us")),
            "rand4k_direct_p50_us": med(lambda t: t["rand4k_direct"].get("p50_us")),
            "rand4k_direct_p99_us": med(lambda t: t["rand4k_direct"].get("p99_us")),
            "rand4k_direct_hot_p50_us": med(lambda t: t.get("rand4k_direct_hot", {}).get("p50_us")),
            "rand4k_direct_hot_p99_us": med(lambda t: t.get("rand4k_direct_hot", {}).get("p99_us")),
            "full_fetch_s": med(lambda t: t["full_fetch"]["s"]),
            "full_fetch_daemon_cpu_s": med(lambda t: t["full_fetch"].get("daemon_cpu_s")),
            "rss_after_mount_MB": med(
                lambda t: (t.get("rss_after_mount_bytes") or 0) / 1e6 or None
            ),
            "rss_after_full_fetch_MB": med(
                lambda t: (t.get("rss_after_full_fetch_bytes") or 0) / 1e6 or None
            ),
        }
    doc["summary"] = summ
    out = common.save(args, doc, headline(summ))
    print(json.dumps(summ, indent=1))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
