"""Bounded under load: many containers reading lazily pulled images at once.

Real docker-registry, containerd 1.6 + runc, ``ctr-remote i rpull`` and our daemon with
background fetch on (the default), a disk cache bound far below what the containers read,
and a small memory cache (so reads go through the disk cache). Images, every layer
converted by our ``stargz convert`` (20 distinct layers in all):

- ``corners``: busybox + the two layers of the corners fixture;
- ``py-a``, ``py-b``, ``py-c``: busybox + 6, 6 and 5 layers of this machine's Python
  standard library (``/usr/lib/python3.11``, its top-level entries split into 17 groups of
  about equal size).

Part 1: 16 containers (4 per image) start at once; each hashes its image's files in a
fresh random order per pass for ``--duration`` s with busybox ``sha256sum`` against the
ground truth (the original tar layers), counting wrong bytes and failed reads (the loop:
``tests/harness/load.py``). The page cache of the layers' files is dropped every 2 s
(``posix_fadvise`` on those files only), so reads keep reaching the daemon. Sampled every
0.5 s: daemon RSS; the cache's chunk and merged files on disk (those all present at one
instant: see ``harness.load.cache_usage``), their lengths (``cache_files``) and their
blocks (``cache_disk``); tmp/ (writes in flight) apart; the daemon's own count
(``stargz_fs_disk_cache_bytes``) and ``stargz_fs_disk_cache_evictions_total``.

Part 2: the same, plus a fifth image: busybox + the 101k-entry many-files layer
(``benchmarks/_many_files.py``), read by 4 of the 16 containers (3 per other image).

Asserted, and recorded: every container finishes (no read hangs), 0 failed reads, 0 wrong
bytes, cache on disk and counted <= the bound, evictions > 0 during the run, daemon RSS
peak <= ``--rss-bound-mb`` (300 MB for part 1, 500 MB for part 2: after rpull the daemon
holds ~70 MB, ~140 MB with the 101k-entry TOC; on top, the 8 MiB memory cache, up to
16 MiB of decoded chunks per fetch in flight, and what the first reads of a layer add).
Exit status 1 if any broke.

    python -m benchmarks.bench_load [--quick] [--duration 60] [--containers 16]
        [--bound-fraction 0.25] [--parts 1,2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import log
from tests.harness.load import (
    NS,
    Component,
    LoadImage,
    LoadRun,
    check,
    component_from_files,
    component_from_layout,
    compose,
    daemon_config,
    files_of,
    rpull,
    split_tree,
)
from tests.harness.procs import (
    Containerd,
    Registry,
    StargzDaemon,
    free_port,
    make_tempdir,
    shared_dir,
)

STDLIB = "/usr/lib/python3.11"
#: Memory chunk cache during the run (the default is 64 MiB: most of the images would be
#: served from memory, and the disk cache under test would see few reads).
MEMORY_BYTES = 8 << 20


def build_images(work: Path, quick: bool) -> list[LoadImage]:
    """The four images (see the module docstring); ``quick``: 2 Python images of 2 layers."""
    fixtures = shared_dir() / "fixtures"
    busybox = component_from_layout(work, "busybox", fixtures / "oci-busybox", "1")
    corners = component_from_layout(work, "corners", fixtures / "oci-corners", "orig")
    groups = split_tree(STDLIB, 4 if quick else 17)
    py = [
        component_from_files(work, f"py{i:02d}", files_of(g, STDLIB)) for i, g in enumerate(groups)
    ]
    cuts = [(0, 2), (2, 4)] if quick else [(0, 6), (6, 12), (12, 17)]
    images = [compose(work, "corners", [busybox, corners])]
    for name, (a, b) in zip(("py-a", "py-b", "py-c"), cuts, strict=False):
        images.append(compose(work, name, [busybox, *py[a:b]]))
    return images


def many_files_image(work: Path) -> LoadImage:
    from benchmarks._many_files import build_many_files

    busybox = Component("busybox", work / "busybox")
    many = Component("many", build_many_files())
    return compose(work, "many", [busybox, many])


def distinct_bytes(images: list[LoadImage]) -> int:
    """Bytes of the distinct regular files of the images (busybox counted once)."""
    seen: dict[tuple[str, str], int] = {}
    for img in images:
        for path, (sha, size) in img.files.items():
            seen[(path, sha)] = size
    return sum(seen.values())


def plan(images: list[LoadImage], n: int, many: LoadImage | None) -> list[tuple[str, LoadImage]]:
    """``n`` containers: with ``many``, a quarter of them on it; the rest round-robin."""
    k = n // 4 if many is not None else 0
    out = [(f"many-{i:02d}", many) for i in range(k)] if many is not None else []
    out += [(f"load-{i:02d}", images[i % len(images)]) for i in range(n - k)]
    return out


def run_part(
    part: str,
    images: list[LoadImage],
    many: LoadImage | None,
    reg: Registry,
    args: argparse.Namespace,
    bound: int,
) -> dict[str, Any]:
    metrics = f"127.0.0.1:{free_port()}"
    every = [*images, *([many] if many is not None else [])]
    res: dict[str, Any] = {"part": part, "loadavg_before": os.getloadavg()}
    with contextlib.ExitStack() as stack:
        sd = StargzDaemon.start(
            make_tempdir("sgz-ld-"),
            config_text=daemon_config(metrics, bound, MEMORY_BYTES),
            log_level="info",
        )
        stack.callback(sd.close)
        c = Containerd.start(sd.address)
        stack.callback(c.close)
        t0 = time.perf_counter()
        for img in every:
            rpull(c, img.ref)
        res["rpull_s"] = round(time.perf_counter() - t0, 2)
        res["rss_after_rpull"] = common.proc_usage(sd.pid).get("rss_bytes")
        layers = {d["digest"] for img in every for d in img.layers}
        res["layers_mounted"] = len(layers)
        work = make_tempdir("sgz-ldw-")
        stack.callback(shutil.rmtree, work, True)
        skip = [many.layers[-1]["digest"]] if many is not None else []
        lr = LoadRun(c, sd, metrics, work, duration=args.duration, grace=args.grace, drop_skip=skip)
        containers = plan(images, args.containers, many)
        log(f"part {part}: {len(containers)} containers, {len(layers)} layers, {args.duration} s")
        report = lr.run(containers)
        res["loadavg_after"] = os.getloadavg()
        res["daemon_alive"] = sd.alive()
        res["daemon_errors"] = [
            r for r in sd.log_records() if r.get("level") in ("error", "critical")
        ][:20]
        res["report"] = report
        problems = check(report, bound)
        rss_bound = float(args.rss_bound_mb.split(",")[int(part) - 1]) * 1e6
        res["rss_bound_bytes"] = rss_bound
        if (report["rss_peak"] or 0) > rss_bound:
            problems.append(f"RSS peak {report['rss_peak']} B > bound {rss_bound:.0f} B")
        if not sd.alive():
            problems.append("the daemon died")
        res["problems"] = problems
    return res


def summary(part: dict[str, Any], bound: int) -> dict[str, Any]:
    r = part["report"]
    mb = 1e6
    return {
        "containers": len(r["containers"]),
        "layers_mounted": part["layers_mounted"],
        "finished": sum(c["finished"] for c in r["containers"]),
        "files_verified": r["files_ok"],
        "GB_verified": round(r["bytes_verified"] / 1e9, 3),
        "wrong": r["wrong"],
        "failed": r["failed"],
        "rss_peak_MB": round((r["rss_peak"] or 0) / mb, 1),
        "rss_median_MB": round((r["rss_median"] or 0) / mb, 1),
        "rss_after_rpull_MB": round((part["rss_after_rpull"] or 0) / mb, 1),
        "rss_bound_MB": round(part["rss_bound_bytes"] / mb),
        "cache_bound_MB": round(bound / mb, 2),
        "cache_files_peak_MB": round(r["cache_bytes_peak"] / mb, 2),
        "cache_disk_peak_MB": round(r["cache_disk_bytes_peak"] / mb, 2),
        "cache_counted_peak_MB": round((r["accounted_bytes_peak"] or 0) / mb, 2),
        "cache_tmp_peak_MB": round(r["cache_tmp_bytes_peak"] / mb, 2),
        "evictions": (r["evictions_end"] or 0) - (r["evictions_start"] or 0),
        "wall_s": r["wall_s"],
        "loadavg_1m_after": round(part["loadavg_after"][0], 2),
        "problems": part["problems"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 containers, 20 s, smaller images")
    ap.add_argument("--duration", type=float, default=None, help="seconds per container")
    ap.add_argument("--containers", type=int, default=None)
    ap.add_argument("--grace", type=float, default=180, help="s past the end before stuck")
    ap.add_argument(
        "--bound-fraction",
        type=float,
        default=0.25,
        help="disk cache bound as a fraction of the images' distinct bytes",
    )
    ap.add_argument(
        "--rss-bound-mb",
        default="300,500",
        help="asserted daemon RSS peak bound of part 1, part 2 (MB)",
    )
    ap.add_argument("--parts", default="1,2", help="1: 4 images; 2: plus the 101k-entry layer")
    common.add_output_args(ap, "load")
    args = ap.parse_args()
    args.duration = args.duration or (20 if args.quick else 60)
    args.containers = args.containers or (8 if args.quick else 16)
    parts = args.parts.split(",")
    doc: dict[str, Any] = {
        "benchmark": "load",
        "date": common.now_utc(),
        "machine": common.machine(
            containerd=common.tool_version(["containerd", "--version"]),
            runc=common.tool_version(["runc", "--version"]),
        ),
        "params": {
            "quick": args.quick,
            "duration_s": args.duration,
            "containers": args.containers,
            "bound_fraction": args.bound_fraction,
            "memory_cache_bytes": MEMORY_BYTES,
            "rss_bound_mb": args.rss_bound_mb,
            "sample_interval_s": 0.5,
            "page_cache_drop_every_s": 2.0,
            "namespace": NS,
        },
        "method": __doc__,
        "parts": [],
    }
    work = make_tempdir("sgz-ldimg-")
    try:
        log("building images")
        t0 = time.perf_counter()
        images = build_images(work, args.quick)
        many = many_files_image(work) if "2" in parts else None
        doc["build_s"] = round(time.perf_counter() - t0, 1)
        distinct = distinct_bytes(images)
        bound = int(distinct * args.bound_fraction)
        doc["images"] = {
            img.name: {
                "layers": len(img.layers),
                "files": len(img.files),
                "bytes": img.uncompressed,
                "compressed": sum(d["size"] for d in img.layers),
            }
            for img in [*images, *([many] if many else [])]
        }
        doc["distinct_layers_part1"] = len({d["digest"] for i in images for d in i.layers})
        doc["distinct_bytes_part1"] = distinct
        doc["cache_bound_bytes"] = bound
        log(json.dumps(doc["images"]), f"bound {bound}")
        with Registry.start(make_tempdir("sgz-ldreg-")) as reg:
            for img in [*images, *([many] if many else [])]:
                img.ref = reg.push_oci(img.layout, img.tag, f"load-{img.name}:1")
            for p in parts:
                res = run_part(p, images, many if p == "2" else None, reg, args, bound)
                res["summary"] = summary(res, bound)
                log(json.dumps(res["summary"]))
                doc["parts"].append(res)
                common.checkpoint(args, doc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    headline = {f"part{p['part']}": p["summary"] for p in doc["parts"]}
    for h in headline.values():
        h.pop("problems", None)
    path = common.save(args, doc, headline)
    print(json.dumps({p["part"]: p["summary"] for p in doc["parts"]}, indent=1))
    print(path)
    return 1 if any(p["problems"] for p in doc["parts"]) else 0


if __name__ == "__main__":
    sys.exit(main())
