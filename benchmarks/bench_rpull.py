"""``stargz rpull`` (Python) against Go's ``ctr-remote i rpull``, same run, same images.

Each trial starts a fresh daemon (lazy pulling on, background fetch off) and containerd
1.6 for each client, in shuffled order, and times the whole command as a user runs it
(wall clock: interpreter start and imports included for ours) for two images from a
local docker-registry:

- ``esgz``: ``oci-corners:esgz``, 2 eStargz layers, both become remote snapshots;
- ``plain``: ``oci-corners:orig``, 2 plain tar+gzip layers the daemon refuses, so each
  client downloads them and has containerd unpack them.

Also timed: importing ``stargz.containerd.pull`` alone in a fresh interpreter (what our
client pays before its first request; aiohttp and grpc are most of it).

    python -m benchmarks.bench_rpull [--trials 5]

Needs root, containerd, runc, docker-registry, skopeo and ctr-remote. Writes
``results/rpull.json``. Never asserts.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time

from benchmarks import common
from tests.harness import Containerd, Registry, StargzDaemon, run, shared_dir

NS = "bench"
IMAGES = {"esgz": "esgz", "plain": "orig"}
CLIENTS = ("go", "py")


def argv(client: str, address: str, ref: str) -> list[str]:
    if client == "go":
        return ["ctr-remote", "-a", address, "-n", NS, "images", "rpull", "--plain-http", ref]
    return [sys.executable, "-m", "stargz.cli.main", "rpull", "-q", "-a", address, "-n", NS, ref]


def one_pull(client: str, ref: str) -> float:
    with (
        StargzDaemon.start(config_text="no_background_fetch = true\n", log_level="info") as sd,
        Containerd.start(sd.address) as c,
    ):
        t0 = time.perf_counter()
        run(argv(client, c.address, ref))
        return time.perf_counter() - t0


def import_time() -> float:
    code = "import time; t = time.perf_counter(); import stargz.containerd.pull; "
    code += "print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout)


def main(argv_: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5, help="pulls per client and image")
    common.add_output_args(ap, "rpull")
    args = ap.parse_args(argv_)
    if os.geteuid() != 0:
        sys.exit("bench_rpull.py needs root (containerd, runc, FUSE)")
    layout = shared_dir() / "fixtures" / "oci-corners"
    times: dict[str, dict[str, list[float]]] = {i: {c: [] for c in CLIENTS} for i in IMAGES}
    with Registry.start() as reg:
        refs = {i: reg.push_oci(layout, tag, f"corners:{tag}") for i, tag in IMAGES.items()}
        for trial in range(args.trials):
            runs = [(i, c) for i in IMAGES for c in CLIENTS]
            random.shuffle(runs)
            for image, client in runs:
                times[image][client].append(one_pull(client, refs[image]))
            print(f"trial {trial + 1}/{args.trials} done")
    imports = [import_time() for _ in range(args.trials)]
    result = {
        "benchmark": "rpull",
        "date": common.now_utc(),
        "machine": common.machine(ctr_remote=common.tool_version(["ctr-remote", "--version"])),
        "params": {"trials": args.trials, "images": IMAGES},
        "seconds": {i: {c: common.summary(v) for c, v in cs.items()} for i, cs in times.items()},
        "trials": times,
        "import_seconds": common.summary(imports),
    }
    headline = {
        i: {c: round(result["seconds"][i][c]["median"], 3) for c in CLIENTS} for i in IMAGES
    }
    headline["import_s_median"] = round(result["import_seconds"]["median"], 3)
    path = common.save(args, result, headline)
    print(f"{'image':<8}{'go median s':>12}{'py median s':>12}{'py/go':>8}")
    for i in IMAGES:
        go, py = headline[i]["go"], headline[i]["py"]
        print(f"{i:<8}{go:>12.3f}{py:>12.3f}{py / go:>8.2f}")
    print(f"importing stargz.containerd.pull: median {headline['import_s_median']:.3f} s")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
