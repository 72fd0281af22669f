"""Converter throughput and output size at every gzip level: ours vs Go ``ctr-remote i convert``.

Both convert the same gzip image built from this machine's files. Go's converter works
on a containerd content store, so the harness starts a private containerd (temporary
root, socket and state; stopped by PID), imports the image once, then times only
``ctr-remote i convert --oci --estargz``. Ours times ``stargz convert`` between OCI
layout tags. Every trial runs each contender once, in a shuffled order (so a burst of
load from elsewhere lands on different contenders in different trials); medians and p99
are reported, with the CPU seconds each contender used (ours: the CLI process; Go:
``ctr-remote``, which compresses, plus its containerd), which load on the machine
inflates much less than wall time.

    python -m benchmarks.bench_convert [--trials 3] [--go-levels 9] [--our-levels 0,1,...,9]

Writes ``results/convert.json`` and prints a markdown table (one row per contender).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import common
from benchmarks._images import existing, go_image_layers_size, layout_layers_size, make_layout
from benchmarks.common import percentile
from stargz.estargz.writer import DEFAULT_GZIP_LEVEL
from tests.harness.procs import Containerd, run

NS = "bench"
TREES = existing(["/usr/lib/python3.11", "/usr/lib/x86_64-linux-gnu/perl", "/usr/share/perl"])
#: What our gzip levels run on (stargz.estargz.writer._gzip_compressor).
OUR_CODEC = {0: "stored"} | {1: "ISA-L 1"} | {n: f"libdeflate {n}" for n in range(2, 10)}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _pid_cpu(pid: int) -> float:
    """User + system seconds of a running process (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _go_trial(cd: Containerd, src_ref: str, lvl: str, trial: int) -> tuple[float, float, int]:
    dst = f"bench/out:go{lvl}-{trial}"
    cpu0, cd0 = _children_cpu(), _pid_cpu(cd.pid)
    t0 = time.perf_counter()
    run(
        [
            *("ctr-remote", "-a", cd.address, "-n", NS, "i", "convert", "--oci", "--estargz"),
            *("--estargz-compression-level", lvl, src_ref, dst),
        ],
        timeout=3600,
    )
    secs = time.perf_counter() - t0
    cpu = _children_cpu() - cpu0 + _pid_cpu(cd.pid) - cd0
    size = go_image_layers_size(cd, dst, NS)
    cd.ctr("i", "rm", "--sync", dst, check=False, ns=NS)
    return secs, cpu, size


def _our_trial(layout: str, lvl: str, trial: int) -> tuple[float, float, int]:
    flags = [] if lvl == "default" else ["--compression-level", lvl]
    tag = f"ours{lvl}-{trial}"
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "stargz.cli.main", "convert", "-q", *flags]
        + [f"oci:{layout}:orig", f"oci:{layout}:{tag}"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    secs = time.perf_counter() - t0
    return secs, _children_cpu() - cpu0, layout_layers_size(layout, tag)


def _table(summary: dict, go_key: str) -> str:
    go = summary[go_key]
    rows = [
        "| converter, gzip level | output | vs Go size | median (p99) | MB/s | CPU s "
        "| speed vs Go | CPU vs Go |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summary.values():
        rows.append(
            f"| {r['label']} | {r['output_bytes'] / 1e6:.2f} MB "
            f"| {100 * (r['output_bytes'] / go['output_bytes'] - 1):+.1f}% "
            f"| {r['median_s']:.2f} s ({r['p99_s']:.2f}) | {r['mb_per_s']:.1f} "
            f"| {r['cpu_median_s']:.2f} | {go['median_s'] / r['median_s']:.1f}x "
            f"| {go['cpu_median_s'] / r['cpu_median_s']:.1f}x |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--go-levels", default="9", help="Go gzip levels (9 is Go's default)")
    ap.add_argument(
        "--our-levels",
        default=",".join(map(str, range(10))),
        help="our gzip levels ('default' = no flag)",
    )
    ap.add_argument("--seed", type=int, default=1, help="of the shuffled order in each trial")
    common.add_output_args(ap, "convert")
    args = ap.parse_args(argv)
    go_levels = [x for x in args.go_levels.split(",") if x]
    our_levels = [x for x in args.our_levels.split(",") if x]
    rng = random.Random(args.seed)
    base = tempfile.mkdtemp(prefix="bench-convert-")
    cd = None
    load_before = [round(x, 2) for x in os.getloadavg()]
    try:
        layout = os.path.join(base, "layout")
        sizes = make_layout(layout, "orig", [[t] for t in TREES])
        archive = os.path.join(base, "image.tar")
        subprocess.run(["tar", "-C", layout, "-cf", archive, "."], check=True)
        # Go's converter works on containerd's content store; no snapshotter is involved,
        # so the proxy plugin address is never dialled.
        cd = Containerd.start(os.path.join(base, "unused-stargz.sock"))
        cd.ctr("i", "import", "--base-name", "bench/img", "--digests", archive, ns=NS)
        src_ref = next(
            line.split()[0]
            for line in cd.ctr("i", "ls", "-q", ns=NS).stdout.splitlines()
            if line.strip()
        )
        results: dict[str, dict] = {}
        plan = [("go", lvl) for lvl in go_levels] + [("ours", lvl) for lvl in our_levels]
        for trial in range(args.trials):
            order = plan[:]
            rng.shuffle(order)
            for who, lvl in order:
                key = f"{who}-level{lvl}"
                load = os.getloadavg()[0]
                if who == "go":
                    secs, cpu, size = _go_trial(cd, src_ref, lvl, trial)
                else:
                    secs, cpu, size = _our_trial(layout, lvl, trial)
                r = results.setdefault(key, {"seconds": [], "cpu": [], "load": [], "bytes": size})
                r["seconds"].append(secs)
                r["cpu"].append(cpu)
                r["load"].append(round(load, 2))
                print(
                    f"trial {trial} {key}: {secs:.2f}s cpu {cpu:.2f}s {size} B load {load:.2f}",
                    file=sys.stderr,
                )
        summary = {}
        for who, lvl in plan:
            key = f"{who}-level{lvl}"
            r = results[key]
            med = statistics.median(r["seconds"])
            if who == "go":
                label = f"Go, {lvl}" + (" (Go's default)" if lvl == "9" else "")
            else:
                n = DEFAULT_GZIP_LEVEL if lvl == "default" else int(lvl)
                label = f"ours, {lvl} ({OUR_CODEC[n]})"
                if n == DEFAULT_GZIP_LEVEL:
                    label += " (default)"
            summary[key] = {
                "label": label,
                "median_s": med,
                "p99_s": percentile(r["seconds"], 99),
                "mb_per_s": sizes["uncompressed"] / 1e6 / med,
                "cpu_median_s": statistics.median(r["cpu"]),
                "output_bytes": r["bytes"],
                "trials": r["seconds"],
                "cpu_trials": r["cpu"],
                "loadavg_1m_at_start": r["load"],
            }
        ratios = {}
        for glvl in go_levels:
            go = summary[f"go-level{glvl}"]
            for olvl in our_levels:
                ours = summary[f"ours-level{olvl}"]
                ratios[f"ours-{olvl}_vs_go-{glvl}"] = {
                    "speedup": go["median_s"] / ours["median_s"],
                    "cpu_ratio_go_over_ours": go["cpu_median_s"] / ours["cpu_median_s"],
                    "size_ratio_ours_over_go": ours["output_bytes"] / go["output_bytes"],
                }
        table = _table(summary, f"go-level{go_levels[0]}")
        doc = {
            "benchmark": "convert",
            "date": common.now_utc(),
            "machine": common.machine(loadavg_at_start=load_before),
            "input": {"trees": TREES, **sizes},
            "trials": args.trials,
            "results": summary,
            "ratios": ratios,
            "table_markdown": table,
        }
        headline = {
            key: {
                "speedup": round(r["speedup"], 2),
                "size": round(r["size_ratio_ours_over_go"], 3),
            }
            for key, r in ratios.items()
        }
        out = common.save(args, doc, headline)
        print(table)
        print(out)
        return 0
    finally:
        if cd is not None:
            cd.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
