"""``stargz rpull`` (Python) against Go's ``ctr-remote i rpull``, same run, same images.

Each trial starts a fresh daemon (lazy pulling on, background fetch off) and containerd
1.6 for each client, in shuffled order, and times the whole command as a user runs it
(wall clock: interpreter start and imports included for ours) for two images from a
local docker-registry:

- ``esgz``: ``oci-corners:esgz``, 2 eStargz layers, both become remote snapshots;
- ``plain``: ``oci-corners:orig``, 2 plain tar+gzip layers the daemon refuses, so each
  client downloads them and has containerd unpack them.

Clients:

- ``go``: ``ctr-remote i rpull``;
- ``py``: ``stargz rpull --in-process`` (the pull made in the command's own process);
- ``py-daemon``: ``stargz rpull`` asking the daemon (``stargz.v1.Pull``): the command
  only prints what the daemon streams; the daemon's first pull after its start loads its
  registry client and containerd's stubs, so that is in the time (as the first lazy
  mount pays it on the other paths);
- ``py-daemon-warm``: the same, after the daemon pulled another image (busybox, untimed)
  from the same registry: a daemon that has been up a while (registry client loaded,
  its connection to the registry open).

Also timed, each in a fresh interpreter: importing ``stargz.containerd.pull`` (what the
in-process client pays before its first request; aiohttp and grpc are most of it) and
``stargz.cli.daemon_pull`` (the daemon path's client: grpc and the Pull stubs), and
``stargz rpull --help`` as a whole process (the command's start-up and exit).

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
from typing import Any

from benchmarks import common
from tests.harness import Containerd, Registry, StargzDaemon, run, shared_dir

NS = "bench"
IMAGES = {"esgz": "esgz", "plain": "orig"}
CLIENTS = ("go", "py", "py-daemon", "py-daemon-warm")


def argv(client: str, address: str, ref: str, daemon: str) -> list[str]:
    if client == "go":
        return ["ctr-remote", "-a", address, "-n", NS, "images", "rpull", "--plain-http", ref]
    where = ["--in-process"] if client == "py" else ["--daemon-address", daemon]
    py = [sys.executable, "-m", "stargz.cli.main", "rpull", "-q", *where]
    return [*py, "-a", address, "-n", NS, ref]


def one_pull(client: str, ref: str, warm_ref: str) -> float:
    with (
        StargzDaemon.start(config_text="no_background_fetch = true\n", log_level="info") as sd,
        Containerd.start(sd.address) as c,
    ):
        if client == "py-daemon-warm":
            run(argv("py-daemon", c.address, warm_ref, sd.address))
        t0 = time.perf_counter()
        run(argv(client, c.address, ref, sd.address))
        return time.perf_counter() - t0


def import_time(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; "
    code += "print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout)


def help_time() -> float:
    """``stargz rpull --help`` as a whole process: the command's start-up and exit."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stargz.cli.main", "rpull", "--help"], check=True,
                   capture_output=True)  # fmt: skip
    return time.perf_counter() - t0


def main(argv_: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5, help="pulls per client and image")
    common.add_output_args(ap, "rpull")
    args = ap.parse_args(argv_)
    if os.geteuid() != 0:
        sys.exit("bench_rpull.py needs root (containerd, runc, FUSE)")
    fixtures = shared_dir() / "fixtures"
    layout = fixtures / "oci-corners"
    times: dict[str, dict[str, list[float]]] = {i: {c: [] for c in CLIENTS} for i in IMAGES}
    with Registry.start() as reg:
        refs = {i: reg.push_oci(layout, tag, f"corners:{tag}") for i, tag in IMAGES.items()}
        warm_ref = reg.push_oci(fixtures / "oci-busybox", "esgz", "warm:esgz")
        for trial in range(args.trials):
            runs = [(i, c) for i in IMAGES for c in CLIENTS]
            random.shuffle(runs)
            for image, client in runs:
                times[image][client].append(one_pull(client, refs[image], warm_ref))
            print(f"trial {trial + 1}/{args.trials} done")
    modules = {"in_process": "stargz.containerd.pull", "daemon_path": "stargz.cli.daemon_pull"}
    imports = {k: [import_time(m) for _ in range(args.trials)] for k, m in modules.items()}
    helps = [help_time() for _ in range(args.trials)]
    result = {
        "benchmark": "rpull",
        "date": common.now_utc(),
        "machine": common.machine(ctr_remote=common.tool_version(["ctr-remote", "--version"])),
        "params": {"trials": args.trials, "images": IMAGES, "clients": CLIENTS},
        "seconds": {i: {c: common.summary(v) for c, v in cs.items()} for i, cs in times.items()},
        "trials": times,
        "import_seconds": common.summary(imports["in_process"]),
        "import_seconds_by_path": {k: common.summary(v) for k, v in imports.items()},
        "help_process_seconds": common.summary(helps),
    }
    headline: dict[str, Any] = {
        i: {c: round(result["seconds"][i][c]["median"], 3) for c in CLIENTS} for i in IMAGES
    }
    headline["import_s_median"] = {
        k: round(v["median"], 3) for k, v in result["import_seconds_by_path"].items()
    }
    headline["help_process_s_median"] = round(result["help_process_seconds"]["median"], 3)
    path = common.save(args, result, headline)
    print(f"{'image':<8}" + "".join(f"{c + ' med/p95 s':>26}" for c in CLIENTS))
    for i in IMAGES:
        cells = [
            f"{result['seconds'][i][c]['median']:.3f} / {result['seconds'][i][c]['p95']:.3f}"
            for c in CLIENTS
        ]
        print(f"{i:<8}" + "".join(f"{x:>26}" for x in cells))
    for k, m in modules.items():
        print(f"importing {m}: median {headline['import_s_median'][k]:.3f} s")
    print(f"stargz rpull --help process: median {headline['help_process_s_median']:.3f} s")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
