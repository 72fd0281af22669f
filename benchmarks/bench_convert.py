"""Converter throughput and output size: ours vs Go ``ctr-remote i convert``, one run.

Both convert the same gzip image built from this machine's files. Go's converter works
on a containerd content store, so the harness starts a private containerd (temporary
root, socket and state; stopped by PID), imports the image once, then times only
``ctr-remote i convert --oci --estargz``. Ours times ``stargz convert`` between OCI
layout tags. Trials alternate between contenders; medians and p95 are reported.

    python -m benchmarks.bench_convert [--trials 5] [--go-levels 9] [--our-levels default,6]

Writes ``results/convert.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import common
from benchmarks._images import existing, go_image_layers_size, layout_layers_size, make_layout
from benchmarks.common import percentile
from tests.harness.procs import Containerd, run

NS = "bench"
TREES = existing(["/usr/lib/python3.11", "/usr/lib/x86_64-linux-gnu/perl", "/usr/share/perl"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--go-levels", default="9", help="Go gzip levels (9 is Go's default)")
    ap.add_argument(
        "--our-levels", default="default,6", help="our gzip levels ('default' = no flag)"
    )
    common.add_output_args(ap, "convert")
    args = ap.parse_args(argv)
    go_levels = [x for x in args.go_levels.split(",") if x]
    our_levels = [x for x in args.our_levels.split(",") if x]
    base = tempfile.mkdtemp(prefix="bench-convert-")
    cd = None
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
            for who, lvl in plan:
                key = f"{who}-level{lvl}"
                if who == "go":
                    dst = f"bench/out:go{lvl}-{trial}"
                    t0 = time.perf_counter()
                    run(
                        [
                            "ctr-remote",
                            "-a",
                            cd.address,
                            "-n",
                            NS,
                            "i",
                            "convert",
                            "--oci",
                            "--estargz",
                            "--estargz-compression-level",
                            str(lvl),
                            src_ref,
                            dst,
                        ],
                        timeout=3600,
                    )
                    secs = time.perf_counter() - t0
                    size = go_image_layers_size(cd, dst, NS)
                    cd.ctr("i", "rm", "--sync", dst, check=False, ns=NS)
                else:
                    flags = [] if lvl == "default" else ["--compression-level", lvl]
                    t0 = time.perf_counter()
                    subprocess.run(
                        [
                            sys.executable,
                            "-m",
                            "stargz.cli.main",
                            "convert",
                            "-q",
                            *flags,
                            f"oci:{layout}:orig",
                            f"oci:{layout}:ours{lvl}-{trial}",
                        ],
                        check=True,
                    )
                    secs = time.perf_counter() - t0
                    size = layout_layers_size(layout, f"ours{lvl}-{trial}")
                r = results.setdefault(key, {"seconds": [], "bytes": size})
                r["seconds"].append(secs)
                print(f"trial {trial} {key}: {secs:.2f}s {size} B", file=sys.stderr)
        summary = {}
        for key, r in results.items():
            med = statistics.median(r["seconds"])
            summary[key] = {
                "median_s": med,
                "p95_s": percentile(r["seconds"], 95),
                "mb_per_s": sizes["uncompressed"] / 1e6 / med,
                "output_bytes": r["bytes"],
                "trials": r["seconds"],
            }
        ratios = {}
        for glvl in go_levels:
            go = summary[f"go-level{glvl}"]
            for olvl in our_levels:
                ours = summary[f"ours-level{olvl}"]
                ratios[f"ours-{olvl}_vs_go-{glvl}"] = {
                    "speedup": go["median_s"] / ours["median_s"],
                    "size_ratio_ours_over_go": ours["output_bytes"] / go["output_bytes"],
                }
        doc = {
            "benchmark": "convert",
            "date": common.now_utc(),
            "machine": common.machine(),
            "input": {"trees": TREES, **sizes},
            "results": summary,
            "ratios": ratios,
        }
        headline = {
            key: {"speedup": round(r["speedup"], 2), "size": round(r["size_ratio_ours_over_go"], 3)}
            for key, r in ratios.items()
        }
        out = common.save(args, doc, headline)
        for key, r in ratios.items():
            print(
                f"{key}: ours {r['speedup']:.2f}x faster than Go, "
                f"size ours/Go {r['size_ratio_ours_over_go']:.3f}"
            )
        print(out)
        return 0
    finally:
        if cd is not None:
            cd.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
