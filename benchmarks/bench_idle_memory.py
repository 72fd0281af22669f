"""Idle daemon memory: ours vs Go's, and what each import costs ours.

1. Idle RSS: each daemon started with its defaults (ours: socket serving, the FUSE root
   mounted and the registry client preloaded; also ours with ``preload_registry_client =
   false``; Go: socket serving), no layer; VmRSS (and ours' anon/file split) after
   ``--settle`` seconds. The daemons take turns, ``--trials`` times. Go's daemon is the one
   ../shared/tools/go-peer/build.sh builds (``--go-bin``; skipped if it is missing).
2. One layer mounted: a docker-registry on 127.0.0.1 with the busybox fixture image
   (eStargz), containerd in front of each daemon, ``ctr-remote i rpull`` with prefetch and
   background fetch off in both; VmRSS before and ``--settle`` s after the pull.
3. Imports: a fresh interpreter imports the modules a started daemon loads, in its order
   (uvloop, the daemon's CLI, grpc, the gRPC service, the filesystem), printing VmRSS after
   each, so the cost of each step shows; then what is no longer loaded at idle (aiohttp,
   the registry client, prometheus-client), each alone on top of the daemon's set.

    python -m benchmarks.bench_idle_memory [--trials 3] [--settle 2]

Needs root and /dev/fuse. Writes ``results/idle-memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import REPO
from benchmarks.peer import GO_BIN, NO_FETCH, GoDaemon
from tests.harness.procs import Containerd, Registry, StargzDaemon, run, shared_dir

#: ours' default imports the registry client in the background once serving.
NO_PRELOAD = "preload_registry_client = false\n"
#: The steps of a started daemon's imports, in order.
DAEMON_STEPS = [
    "uvloop",
    "stargz.cli.daemon",
    "grpc",
    "stargz.service.server",
    "stargz.fs.filesystem",
    "stargz.fs.registry",
]
#: Loaded only once there is work for them (measured each on top of the daemon's set).
DEFERRED = ["stargz.remote.client", "prometheus_client", "stargz.estargz.writer"]

_PROBE = """
import importlib, json, re, sys
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
out = [["python", rss()]]
for name in sys.argv[1:]:
    importlib.import_module(name)
    out.append([name, rss()])
print(json.dumps(out))
"""


def status(pid: int) -> dict[str, int]:
    text = Path(f"/proc/{pid}/status").read_text()
    keys = ("VmRSS", "RssAnon", "RssFile", "Threads")
    return {k: int(v) for k, v in re.findall(r"(\w+):\s+(\d+)", text) if k in keys}


def import_steps(modules: list[str]) -> list[list]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *modules],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
        timeout=120,
    )
    return json.loads(proc.stdout)


def mounted_rss(who: str, go_bin: str, reg: Registry, ref: str, settle: float) -> dict:
    """RSS of a daemon behind containerd before and after a lazy pull of ``ref``."""
    if who == "ours":
        d = StargzDaemon.start(config_text=NO_FETCH, log_level="info")
    else:
        d = GoDaemon.start(go_bin, reg.host, extra_toml=NO_FETCH)
    cd = None
    try:
        cd = Containerd.start(d.address)
        time.sleep(settle)
        before = status(d.pid)
        run(["ctr-remote", "-a", cd.address, "-n", "idle", "i", "rpull", "--plain-http", ref])
        time.sleep(settle)
        return {"before": before, "mounted": status(d.pid)}
    finally:
        if cd is not None:
            cd.close()
        d.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--settle", type=float, default=2.0)
    ap.add_argument("--go-bin", default=os.environ.get("GO_STARGZ_BIN", GO_BIN))
    common.add_output_args(ap, "idle-memory")
    a = ap.parse_args(argv)
    have_go = os.access(a.go_bin, os.X_OK)
    runs: dict[str, list[dict[str, int]]] = {"ours": [], "ours-no-preload": []}
    runs |= {"go": []} if have_go else {}
    for _ in range(a.trials):
        for who in runs:
            if who == "ours":
                d = StargzDaemon.start(log_level="info")
            elif who == "ours-no-preload":
                d = StargzDaemon.start(config_text=NO_PRELOAD, log_level="info")
            else:
                d = GoDaemon.start(a.go_bin, "127.0.0.1:5000")
            try:
                time.sleep(a.settle)
                runs[who].append(status(d.pid))
            finally:
                d.close()
    idle = {
        who: {
            "rss_mb_median": round(statistics.median(r["VmRSS"] for r in rs) / 1024, 1),
            "trials": rs,
        }
        for who, rs in runs.items()
    }
    mounted: dict[str, list[dict]] = {who: [] for who in runs if who != "ours-no-preload"}
    reg = Registry.start()
    try:
        ref = reg.push_oci(shared_dir() / "fixtures" / "oci-busybox", "esgz", "busybox:esgz")
        for _ in range(a.trials):
            for who in mounted:
                mounted[who].append(mounted_rss(who, a.go_bin, reg, ref, a.settle))
    finally:
        reg.close()
    one_layer = {
        who: {
            "rss_mb_before_median": round(
                statistics.median(r["before"]["VmRSS"] for r in rs) / 1024, 1
            ),
            "rss_mb_mounted_median": round(
                statistics.median(r["mounted"]["VmRSS"] for r in rs) / 1024, 1
            ),
            "trials": rs,
        }
        for who, rs in mounted.items()
    }
    steps = import_steps(DAEMON_STEPS)
    deferred = {}
    for mod in DEFERRED:
        full = import_steps([*DAEMON_STEPS, mod])
        deferred[mod] = round((full[-1][1] - full[-2][1]) / 1024, 1)
    doc = {
        "benchmark": "idle-memory",
        "date": common.now_utc(),
        "machine": common.machine(),
        "params": {
            "trials": a.trials,
            "settle_s": a.settle,
            "go_bin": a.go_bin if have_go else None,
        },
        "results": {
            "idle": idle,
            "one_layer": one_layer,
            "import_steps_rss_kb": steps,
            "deferred_modules_extra_mb": deferred,
        },
    }
    headline = {
        who: {
            "idle_mb": v["rss_mb_median"],
            "one_layer_mb": one_layer[who]["rss_mb_mounted_median"] if who in one_layer else None,
        }
        for who, v in idle.items()
    }
    out = common.save(a, doc, headline)
    print(json.dumps(doc["results"], indent=1))
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
