"""A full metadata walk of a lazily mounted image: ours vs the Go snapshotter, one run.

Both daemons (prefetch and background fetch off) run side by side, each under its own
containerd, and ``ctr-remote i rpull`` the same images from one registry on 127.0.0.1;
both mount the SAME eStargz blobs (our converter's). Each image's rootfs is mounted once
per daemon (a view snapshot, as a container sees it: a bind mount of a one-layer image,
overlayfs over the layers otherwise). Images:

- ``many-files``: one layer, 1000 dirs x 100 files of 100 B (101k TOC entries,
  `benchmarks._many_files`);
- ``usr``: this machine's ``/usr/lib/python3``, ``/usr/lib/python3.11`` and the perl trees,
  one layer each (~6.7k entries), built once under ``/var/cache/stargz-bench/usr-trees``.

Walkers: ``find`` (``find ROOT -printf '%y %s %T@ %p'``: a readdir and an lstat of every
entry, in C) and ``pywalk`` (``os.walk`` + ``os.lstat``, as `bench_daemon_cost` walks).
Each trial drops the page cache, dentries and inodes (``drop_caches`` = 3) first, so every
entry of the walk reaches the daemon. Trials of (daemon, image, walker) are interleaved in
a shuffled order each round, so load from other jobs falls on both daemons alike; the
1-minute load is recorded with every trial. The first walk of each mount (the daemons'
own caches cold) is recorded apart. Before the timed rounds the two mounts' listings
(path, type, mode, size, mtime, link target) are compared: they must be equal.

    python -m benchmarks.bench_walk [--trials 7] [--images many-files,usr]
        [--walkers find,pywalk]

Writes ``results/walk.json`` (progress in ``results/walk.partial.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common
from benchmarks._images import existing, make_layout
from benchmarks._many_files import build_many_files, toc_entries
from benchmarks.common import CACHE, log, proc_usage
from benchmarks.hellobench.images import has_tag
from benchmarks.peer import GO_BIN, NO_FETCH, GoDaemon
from tests.harness.procs import Containerd, Registry, StargzDaemon, make_tempdir, mounted_image, run

NS = "walk"
CONTENDERS = ("ours", "go")
USR = CACHE / "usr-trees"
USR_TREES = [
    "/usr/lib/python3",
    "/usr/lib/python3.11",
    "/usr/lib/x86_64-linux-gnu/perl",
    "/usr/share/perl",
]


def build_usr() -> Path:
    """OCI layout (tags ``orig``: gzip, ``ours``: ``stargz convert``), one layer per tree."""
    lay = USR / "oci"
    if has_tag(lay, "orig") and has_tag(lay, "ours"):
        return lay
    shutil.rmtree(USR, ignore_errors=True)
    USR.mkdir(parents=True)
    trees = existing(USR_TREES)
    log(f"build usr-trees from {trees}")
    make_layout(str(lay), "orig", [[t] for t in trees])
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


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def walk_find(root: Path) -> int:
    p = subprocess.run(
        ["find", str(root), "-printf", "%y %s %T@ %p\n"],
        stdout=subprocess.PIPE,
        check=True,
    )
    return p.stdout.count(b"\n")


def walk_py(root: Path) -> int:
    n = 1
    os.lstat(root)
    for dp, dns, fns in os.walk(root):
        for name in dns + fns:
            os.lstat(os.path.join(dp, name))
            n += 1
    return n


WALKERS = {"find": walk_find, "pywalk": walk_py}


def listing_digest(root: Path) -> tuple[str, int]:
    """sha256 over the sorted (path, type, mode, size, mtime, target, owner) lines of a
    tree below its root (and the lines)."""
    out = subprocess.run(
        ["find", ".", "-printf", "%p %y %m %s %T@ %l %U %G\n"],
        cwd=root,
        stdout=subprocess.PIPE,
        check=True,
    ).stdout
    # directories the TOC does not list (the root, parents of the tar's first entries):
    # Go shows its zero time (year 1) as their mtime, ours the epoch
    out = out.replace(b" -62135596800.0000000000 ", b" 0.0000000000 ")
    lines = sorted(out.splitlines())
    return hashlib.sha256(b"\n".join(lines)).hexdigest(), len(lines), lines


def start_daemon(contender: str, reg: Registry, go_bin: str):
    if contender == "ours":
        return StargzDaemon.start(make_tempdir("sgz-walk-"), config_text=NO_FETCH, log_level="info")
    return GoDaemon.start(go_bin, reg.host, extra_toml=NO_FETCH)


def summarize(doc: dict) -> dict:
    out: dict = {}
    ok = [t for t in doc["trials"] if "error" not in t]
    for img in doc["images"]:
        for w in doc["params"]["walkers"].split(","):
            per: dict = {}
            for c in CONTENDERS:
                xs = [
                    t["walk_s"]
                    for t in ok
                    if (t["image"], t["walker"], t["contender"]) == (img, w, c)
                ]
                if xs:
                    per[c] = common.summary(xs, 4)
            if "ours" in per and "go" in per:
                per["ratio_ours_over_go_median"] = round(
                    per["ours"]["median"] / per["go"]["median"], 3
                )
                per["ratio_ours_over_go_p99"] = round(per["ours"]["p99"] / per["go"]["p99"], 3)
            if per:
                out[f"{img}/{w}"] = per
    return out


def headline(summ: dict) -> dict:
    return {
        k: {
            "ours_s": v.get("ours", {}).get("median"),
            "go_s": v.get("go", {}).get("median"),
            "ratio": v.get("ratio_ours_over_go_median"),
        }
        for k, v in summ.items()
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--images", default="many-files,usr")
    ap.add_argument("--walkers", default="find,pywalk")
    ap.add_argument("--contenders", default="ours,go")
    ap.add_argument("--go-bin", default=GO_BIN)
    ap.add_argument("--seed", type=int, default=0)
    common.add_output_args(ap, "walk")
    args = ap.parse_args(argv)
    images = [x for x in args.images.split(",") if x]
    walkers = [x for x in args.walkers.split(",") if x]
    contenders = [x for x in args.contenders.split(",") if x]
    now = _dt.datetime.now(_dt.UTC)
    rng = random.Random(args.seed or int(now.timestamp()))
    t_start = time.perf_counter()
    doc: dict = {
        "benchmark": "walk",
        "date": now.isoformat(timespec="seconds"),
        "machine": common.machine(find=common.tool_version(["find", "--version"])),
        "method": __doc__.strip().splitlines()[0],
        "params": vars(args),
        "notes": [
            "noprefetch + no_background_fetch in both daemons; both mount the same blobs "
            "(our converter's); page cache, dentries and inodes dropped before every trial",
            "walk_s = wall time of one full walk; entries = lines find printed / entries "
            "os.walk saw; loadavg = 1-minute load at the trial",
        ],
        "images": {},
        "first_walk": [],
        "trials": [],
    }

    def save() -> None:
        doc["summary"] = summarize(doc)
        doc["wall_s"] = time.perf_counter() - t_start
        common.checkpoint(args, doc)

    builders = {"many-files": build_many_files, "usr": build_usr}
    with contextlib.ExitStack() as stack:
        reg = stack.enter_context(Registry.start(make_tempdir("sgz-walkreg-")))
        refs = {}
        for img in images:
            lay = builders[img]()
            refs[img] = reg.push_oci(lay, "ours", f"walk-{img}:ours")
            doc["images"][img] = {"layout": str(lay), "toc_entries": toc_entries(lay, "ours")}
        log(json.dumps(doc["images"]))
        roots: dict[tuple[str, str], Path] = {}
        pids: dict[str, int] = {}
        for c in contenders:
            snap = stack.enter_context(start_daemon(c, reg, args.go_bin))
            pids[c] = snap.pid
            cd = stack.enter_context(Containerd.start(snap.address))
            for img in images:
                t0 = time.perf_counter()
                run(
                    [
                        "ctr-remote",
                        "-a",
                        cd.address,
                        "-n",
                        NS,
                        "i",
                        "rpull",
                        "--plain-http",
                        refs[img],
                    ],
                    timeout=1800,
                )
                doc["images"][img][f"rpull_s_{c}"] = round(time.perf_counter() - t0, 3)
                roots[c, img] = stack.enter_context(mounted_image(cd, refs[img], NS, "stargz"))
        for img in images:
            for c in contenders:
                drop_caches()
                t0 = time.perf_counter()
                n = walk_find(roots[c, img])
                doc["first_walk"].append(
                    {"contender": c, "image": img, "walk_s": time.perf_counter() - t0, "entries": n}
                )
            digests = {c: listing_digest(roots[c, img]) for c in contenders}
            doc["images"][img]["listing"] = {
                c: {"sha256": d, "entries": n} for c, (d, n, _) in digests.items()
            }
            if len({d for d, _, _ in digests.values()}) != 1:
                a, b = (set(x[2]) for x in digests.values())
                raise SystemExit(f"{img}: the mounts' listings differ: {sorted(a ^ b)[:10]}")
        log(json.dumps(doc["first_walk"]))
        for r in range(args.trials):
            order = [(c, i, w) for c in contenders for i in images for w in walkers]
            rng.shuffle(order)
            for c, img, w in order:
                drop_caches()
                u0 = proc_usage(pids[c])
                t0 = time.perf_counter()
                n = WALKERS[w](roots[c, img])
                dt = time.perf_counter() - t0
                u1 = proc_usage(pids[c])
                t = {
                    "round": r,
                    "contender": c,
                    "image": img,
                    "walker": w,
                    "walk_s": dt,
                    "entries": n,
                    "daemon_cpu_s": round(u1.get("cpu_s", 0) - u0.get("cpu_s", 0), 3),
                    "loadavg": os.getloadavg()[0],
                }
                doc["trials"].append(t)
                log(json.dumps(t))
            save()
    save()
    print(json.dumps(doc["summary"], indent=1))
    print(common.save(args, doc, headline(doc["summary"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
