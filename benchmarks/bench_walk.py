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
Each walk drops the page cache, dentries and inodes (``drop_caches`` = 3) first, so every
entry of the walk reaches the daemon. Each round starts both daemons afresh and mounts
every image; ``first`` is the first walk of each mount (what a container's first walk
costs: the daemon has answered nothing about that tree yet), then ``warm`` walks every
(daemon, image, walker) again. Both kinds run in a shuffled order, so load from other
jobs falls on both daemons alike; the 1-minute load is recorded with every walk. In the
first round the two mounts' listings (path, type, mode, size, mtime, link target, owner)
are compared: they must be equal.

    python -m benchmarks.bench_walk [--trials 7] [--images many-files,usr]
        [--walkers find,pywalk] [--baseline-src OTHER_TREE/src]

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
import statistics
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
CONTENDERS = ("ours", "go", "base")
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


def start_daemon(contender: str, reg: Registry, args: argparse.Namespace):
    if contender in ("ours", "base"):
        env = {"PYTHONPATH": args.baseline_src} if contender == "base" else {}
        return StargzDaemon.start(
            make_tempdir("sgz-walk-"), config_text=NO_FETCH, log_level="info", env=env
        )
    return GoDaemon.start(args.go_bin, reg.host, extra_toml=NO_FETCH)


def summarize(doc: dict) -> dict:
    """Per case (``first`` or ``warm`` / image / walker): each daemon's walk seconds
    (n, median, p95, p99, min, max) and ours over Go's."""
    out: dict = {}
    ok = [t for t in doc["trials"] if "error" not in t]
    for case in sorted({(t["kind"], t["image"], t["walker"]) for t in ok}):
        per: dict = {}
        for c in CONTENDERS:
            xs = [t["walk_s"] for t in ok if (t["kind"], t["image"], t["walker"]) == case
                  and t["contender"] == c]  # fmt: skip
            if xs:
                per[c] = common.summary(xs, 4)
                per[c]["daemon_rss_growth_MB_median"] = statistics.median(
                    (t["daemon_rss_after"] - t["daemon_rss_before"]) / 1e6 for t in ok
                    if (t["kind"], t["image"], t["walker"]) == case and t["contender"] == c
                )  # fmt: skip
                per[c]["daemon_cpu_s_median"] = statistics.median(
                    t["daemon_cpu_s"] for t in ok
                    if (t["kind"], t["image"], t["walker"]) == case and t["contender"] == c
                )  # fmt: skip
        for c in ("ours", "base"):
            if c in per and "go" in per:
                per[f"ratio_{c}_over_go_median"] = round(per[c]["median"] / per["go"]["median"], 3)
                per[f"ratio_{c}_over_go_p99"] = round(per[c]["p99"] / per["go"]["p99"], 3)
        out["/".join(case)] = per
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


def rpull(cd: Containerd, ref: str) -> float:
    t0 = time.perf_counter()
    run(["ctr-remote", "-a", cd.address, "-n", NS, "i", "rpull", "--plain-http", ref], timeout=1800)
    return time.perf_counter() - t0


def timed_walk(walker: str, root: Path, pid: int) -> dict:
    """One walk after dropping the caches: seconds, entries, the daemon's CPU seconds."""
    drop_caches()
    u0 = proc_usage(pid)
    t0 = time.perf_counter()
    n = WALKERS[walker](root)
    dt = time.perf_counter() - t0
    u1 = proc_usage(pid)
    return {
        "walk_s": dt,
        "entries": n,
        "daemon_cpu_s": round(u1.get("cpu_s", 0) - u0.get("cpu_s", 0), 3),
        "daemon_rss_before": u0.get("rss_bytes", 0),
        "daemon_rss_after": u1.get("rss_bytes", 0),
        "loadavg": os.getloadavg()[0],
    }


def settle(pids: list[int], quiet_s: float = 1.0, limit_s: float = 20.0) -> float:
    """Wait until no daemon has used CPU for ``quiet_s`` (after a mount a daemon may
    still be busy: a TOC's garbage, containerd's calls); returns the seconds waited."""
    t0 = last_busy = time.perf_counter()
    cpu = [proc_usage(p).get("cpu_s", 0) for p in pids]
    while time.perf_counter() - t0 < limit_s:
        time.sleep(0.25)
        now = [proc_usage(p).get("cpu_s", 0) for p in pids]
        if any(b - a > 0.02 for a, b in zip(cpu, now, strict=True)):
            last_busy = time.perf_counter()
        cpu = now
        if time.perf_counter() - last_busy >= quiet_s:
            break
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=7, help="rounds (fresh daemons each)")
    ap.add_argument("--images", default="many-files,usr")
    ap.add_argument("--walkers", default="find,pywalk")
    ap.add_argument("--contenders", default="ours,go")
    ap.add_argument("--go-bin", default=GO_BIN)
    ap.add_argument(
        "--baseline-src",
        default="",
        help="also run contender 'base': our daemon from another source tree's src/ "
        "(e.g. the tree before a change), in the same rounds",
    )
    ap.add_argument("--seed", type=int, default=0)
    common.add_output_args(ap, "walk")
    args = ap.parse_args(argv)
    images = [x for x in args.images.split(",") if x]
    walkers = [x for x in args.walkers.split(",") if x]
    contenders = [x for x in args.contenders.split(",") if x]
    if args.baseline_src and "base" not in contenders:
        contenders.append("base")
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
            "(our converter's); page cache, dentries and inodes dropped before every walk",
            "each round: both daemons started afresh (each with its own containerd), every "
            "image rpulled and mounted, then a wait until no daemon uses CPU (settle_s); "
            "kind 'first' = the first walk of each mount (find; "
            "the daemon has answered nothing about the tree yet), shuffled; then kind "
            "'warm' = every (daemon, image, walker) once more, shuffled",
            "walk_s = wall time of one full walk; entries = lines find printed / entries "
            "os.walk saw; daemon_cpu_s = the daemon's user+sys during the walk; "
            "daemon_rss_before/after = its RSS around the walk (growth in a 'first' walk: "
            "what the daemon keeps of a walked tree); loadavg = 1-minute load at the end "
            "of the walk",
        ],
        "images": {},
        "trials": [],
    }

    def save() -> None:
        doc["summary"] = summarize(doc)
        doc["wall_s"] = time.perf_counter() - t_start
        common.checkpoint(args, doc)

    def record(t: dict) -> None:
        doc["trials"].append(t)
        log(json.dumps(t))

    builders = {"many-files": build_many_files, "usr": build_usr}
    with Registry.start(make_tempdir("sgz-walkreg-")) as reg:
        refs = {}
        for img in images:
            lay = builders[img]()
            refs[img] = reg.push_oci(lay, "ours", f"walk-{img}:ours")
            doc["images"][img] = {"layout": str(lay), "toc_entries": toc_entries(lay, "ours")}
        log(json.dumps(doc["images"]))
        for r in range(args.trials):
            with contextlib.ExitStack() as stack:
                roots: dict[tuple[str, str], Path] = {}
                pids: dict[str, int] = {}
                for c in contenders:
                    snap = stack.enter_context(start_daemon(c, reg, args))
                    pids[c] = snap.pid
                    cd = stack.enter_context(Containerd.start(snap.address))
                    for img in images:
                        doc["images"][img].setdefault(f"rpull_s_{c}", []).append(
                            round(rpull(cd, refs[img]), 3)
                        )
                        roots[c, img] = stack.enter_context(
                            mounted_image(cd, refs[img], NS, "stargz")
                        )
                doc.setdefault("settle_s", []).append(round(settle(list(pids.values())), 2))
                firsts = [(c, img) for c in contenders for img in images]
                rng.shuffle(firsts)
                for c, img in firsts:
                    settle(list(pids.values()), 0.5, 5)
                    t = timed_walk("find", roots[c, img], pids[c])
                    record({"round": r, "kind": "first", "contender": c, "image": img,
                            "walker": "find", **t})  # fmt: skip
                if r == 0:
                    for img in images:
                        digests = {c: listing_digest(roots[c, img]) for c in contenders}
                        doc["images"][img]["listing"] = {
                            c: {"sha256": d, "entries": n} for c, (d, n, _) in digests.items()
                        }
                        if len({d for d, _, _ in digests.values()}) != 1:
                            a, b = (set(x[2]) for x in digests.values())
                            raise SystemExit(
                                f"{img}: the mounts' listings differ: {sorted(a ^ b)[:10]}"
                            )
                warm = [(c, img, w) for c in contenders for img in images for w in walkers]
                rng.shuffle(warm)
                for c, img, w in warm:
                    t = timed_walk(w, roots[c, img], pids[c])
                    record({"round": r, "kind": "warm", "contender": c, "image": img,
                            "walker": w, **t})  # fmt: skip
            save()
    save()
    print(json.dumps(doc["summary"], indent=1))
    print(common.save(args, doc, headline(doc["summary"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
