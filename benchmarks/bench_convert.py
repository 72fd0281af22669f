"""Converter throughput and output size: ours vs Go ``ctr-remote i convert``, one run.

Both convert the same gzip image built from this machine's files. Go's converter works
on a containerd content store, so the harness starts a private containerd (temporary
root, socket and state; stopped by PID), imports the image once, then times only
``ctr-remote i convert --oci --estargz``. Ours times ``stargz convert`` between OCI
layout tags. Trials alternate between contenders; medians and p95 are reported.

    .venv/bin/python benchmarks/bench_convert.py [--trials 5] [--levels 9,6,1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _images import existing, make_layout  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREES = existing(["/usr/lib/python3.11", "/usr/lib/x86_64-linux-gnu/perl", "/usr/share/perl"])


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Containerd:
    def __init__(self, base: str) -> None:
        self.base = base
        self.sock = os.path.join(base, "containerd.sock")
        os.makedirs(base, exist_ok=True)
        cfg = os.path.join(base, "config.toml")
        with open(cfg, "w") as f:
            f.write(
                "version = 2\n"
                f'root = "{base}/root"\nstate = "{base}/state"\n'
                f'[grpc]\n  address = "{self.sock}"\n'
                '[plugins."io.containerd.internal.v1.opt"]\n'
                f'  path = "{base}/opt"\n'
            )
        self.log = open(os.path.join(base, "containerd.log"), "w")
        self.proc = subprocess.Popen(
            ["containerd", "--config", cfg], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited; see {base}/containerd.log")
            if self.ctr("version", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("containerd did not answer within 30 s")

    def ctr(self, *args: str, tool: str = "ctr", check: bool = True):
        return subprocess.run(
            [tool, "-a", self.sock, "-n", "bench", *args],
            capture_output=True,
            text=True,
            check=check,
        )

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--go-levels", default="9", help="Go gzip levels (9 is Go's default)")
    ap.add_argument(
        "--our-levels", default="default,6", help="our gzip levels ('default' = no flag)"
    )
    args = ap.parse_args()
    go_levels = [x for x in args.go_levels.split(",") if x]
    our_levels = [x for x in args.our_levels.split(",") if x]
    base = tempfile.mkdtemp(prefix="bench-convert-")
    cd = None
    try:
        layout = os.path.join(base, "layout")
        sizes = make_layout(layout, "orig", [[t] for t in TREES])
        archive = os.path.join(base, "image.tar")
        subprocess.run(["tar", "-C", layout, "-cf", archive, "."], check=True)
        cd = Containerd(os.path.join(base, "cd"))
        cd.ctr("i", "import", "--base-name", "bench/img", "--digests", archive)
        src_ref = next(
            line.split()[0] for line in cd.ctr("i", "ls", "-q").stdout.splitlines() if line.strip()
        )
        results: dict[str, dict] = {}
        plan = [("go", lvl) for lvl in go_levels] + [("ours", lvl) for lvl in our_levels]
        for trial in range(args.trials):
            for who, lvl in plan:
                key = f"{who}-level{lvl}"
                if who == "go":
                    dst = f"bench/out:go{lvl}-{trial}"
                    t0 = time.perf_counter()
                    cd.ctr(
                        "i",
                        "convert",
                        "--oci",
                        "--estargz",
                        "--estargz-compression-level",
                        str(lvl),
                        src_ref,
                        dst,
                        tool="ctr-remote",
                    )
                    secs = time.perf_counter() - t0
                    size = _go_image_layers_size(cd, dst)
                    cd.ctr("i", "rm", "--sync", dst, check=False)
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
                    size = _layout_layers_size(layout, f"ours{lvl}-{trial}")
                r = results.setdefault(key, {"seconds": [], "bytes": size})
                r["seconds"].append(secs)
                print(f"trial {trial} {key}: {secs:.2f}s {size} B", file=sys.stderr)
        summary = {}
        for key, r in results.items():
            med = statistics.median(r["seconds"])
            summary[key] = {
                "median_s": med,
                "p95_s": pct(r["seconds"], 95),
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
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "input": {"trees": TREES, **sizes},
            "results": summary,
            "ratios": ratios,
        }
        out = os.path.join(ROOT, "benchmarks", "results", f"convert-{time.strftime('%Y%m%d')}.json")
        with open(out, "w") as f:
            json.dump(doc, f, indent=2)
        for key, r in ratios.items():
            print(
                f"{key}: ours {r['speedup']:.2f}x faster than Go, "
                f"size ours/Go {r['size_ratio_ours_over_go']:.3f}"
            )
        print(out)
        return 0
    finally:
        if cd is not None:
            cd.stop()
        shutil.rmtree(base, ignore_errors=True)


def _layout_layers_size(layout: str, tag: str) -> int:
    from stargz.image.layout import Layout

    lay = Layout(layout)
    man = lay.read_json(lay.resolve(tag)["digest"])
    return sum(x["size"] for x in man["layers"])


def _go_image_layers_size(cd: Containerd, ref: str) -> int:
    target = cd.ctr("i", "ls").stdout.splitlines()
    digest = None
    for line in target:
        parts = line.split()
        if parts and parts[0] == ref:
            digest = parts[2]
    if digest is None:
        raise RuntimeError(f"image {ref} not found after convert")
    man = json.loads(cd.ctr("content", "get", digest).stdout)
    return sum(x["size"] for x in man["layers"])


if __name__ == "__main__":
    sys.exit(main())
