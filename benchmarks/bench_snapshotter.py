"""The snapshotter daemon against containerd's built-in overlayfs snapshotter, same run.

Two measurements, each with its baseline beside it:

1. **Pull + unpack + run** of a multi-layer image (the busybox fixture's layer, the two
   layers of the oci-corners fixture, and a layer of 8 MiB of incompressible data: 4
   layers, ~15 MB compressed, ~340 files) from a local docker-registry, through one
   containerd 1.6, once with ``--snapshotter overlayfs`` and once with ``--snapshotter
   stargz`` (our daemon as a proxy plugin) per trial, in shuffled order. Before each
   measurement the image is removed with a synchronous GC, so every pull downloads and
   unpacks everything. Timed: ``ctr images pull`` + ``ctr run --rm`` (wall clock, as a user
   sees it), and each step alone.
2. **Prepare / Commit / Stat latency**, p50/p99 over the unix socket: straight to our
   daemon, and through containerd's snapshots service for overlayfs and for stargz (what a
   containerd client sees; the difference is the proxy hop plus our daemon).

    python -m benchmarks.bench_snapshotter [--trials 7] [--ops 1000]

Needs root, containerd, runc, docker-registry and skopeo (ci/setup.sh installs them).
Writes ``results/snapshotter.json`` and prints a summary. Never asserts.
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks import common
from benchmarks.common import percentile
from stargz.service.proto.containerd.services.snapshots.v1 import (
    snapshots_pb2 as pb,
)
from stargz.service.proto.containerd.services.snapshots.v1 import (
    snapshots_pb2_grpc as pb_grpc,
)
from tests.harness import Containerd, Registry, StargzDaemon, make_tempdir, shared_dir
from tests.harness.oci import build_image, find_manifest

SNAPSHOTTERS = ("overlayfs", "stargz")
NS = "bench"


def summary(xs: list[float]) -> dict[str, float]:
    return {**common.summary(xs), "mean": statistics.fmean(xs)}


def multi_layer_image(workdir: Path) -> Path:
    """busybox + the two oci-corners layers + 8 MiB of random data, as one OCI layout."""
    corners = shared_dir() / "fixtures" / "oci-corners"
    layers: list[bytes | dict[str, bytes]] = []
    for desc in find_manifest(corners, "orig")["layers"]:
        blob = corners / "blobs" / "sha256" / desc["digest"].split(":")[1]
        layers.append(gzip.decompress(blob.read_bytes()))
    rnd = random.Random(7)
    layers.append({f"opt/data/blob{i}": rnd.randbytes(2 << 20) for i in range(4)})
    base = (shared_dir() / "fixtures" / "oci-busybox", "1")
    return build_image(workdir / "multi", "1", layers, base=base, level=6)


def timed(argv: list[str]) -> float:
    t = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {p.stderr}")
    return dt


def daemon_rpcs(sd: StargzDaemon, since: int) -> tuple[int, list[dict]]:
    """The daemon's per-call log records (debug level) after line ``since``."""
    recs = sd.log_records()
    return len(recs), [r for r in recs[since:] if r.get("msg") == "rpc"]


def pull_run(c: Containerd, sd: StargzDaemon, ref: str, trials: int) -> dict[str, object]:
    ctr = ["ctr", "-a", c.address, "-n", NS]
    times: dict[str, dict[str, list[float]]] = {
        s: {"pull": [], "run": [], "total": []} for s in SNAPSHOTTERS
    }
    # Time spent inside our daemon (sum of its calls' durations) per stargz pull + run:
    # what the daemon adds, without the noise of the whole pull.
    inside_ms: list[float] = []
    calls: list[int] = []
    orders = []
    for trial in range(trials + 1):  # trial 0 warms caches and is dropped
        order = random.sample(SNAPSHOTTERS, len(SNAPSHOTTERS))
        orders.append(order)
        for s in order:
            c.ctr("images", "rm", "--sync", ref, ns=NS, check=False)
            mark, _ = daemon_rpcs(sd, 0)
            pull = timed([*ctr, "images", "pull", "--plain-http", "--snapshotter", s, ref])
            run = timed(
                [
                    *ctr,
                    "run",
                    "--rm",
                    "--snapshotter",
                    s,
                    ref,
                    f"b{trial}{s}",
                    "sh",
                    "-c",
                    "cat /etc/greeting >/dev/null",
                ]
            )
            if trial:
                times[s]["pull"].append(pull)
                times[s]["run"].append(run)
                times[s]["total"].append(pull + run)
                if s == "stargz":
                    _, rpcs = daemon_rpcs(sd, mark)
                    inside_ms.append(sum(r["duration_ms"] for r in rpcs))
                    calls.append(len(rpcs))
        c.ctr("images", "rm", "--sync", ref, ns=NS, check=False)
    out: dict[str, object] = {s: {k: summary(v) for k, v in times[s].items()} for s in times}
    for step in ("total", "pull", "run"):
        ours, base = (statistics.median(times[s][step]) for s in ("stargz", "overlayfs"))
        out[f"ratio_median_{step}"] = ours / base
    out["stargz_daemon_ms_per_pull_run"] = summary(inside_ms)
    out["stargz_daemon_calls_per_pull_run"] = statistics.median(calls)
    out["orders"] = orders[1:]
    out["raw_seconds"] = times
    return out


def latency(stub: pb_grpc.SnapshotsStub, snapshotter: str, ops: int, tag: str) -> dict:
    """Prepare (on a parent) / Commit / Stat, ``ops`` times each, one call at a time."""
    md = (("containerd-namespace", NS),)
    sn = snapshotter
    # Without a GC root, containerd would collect these snapshots under our feet.
    root = {"containerd.io/gc.root": "bench"}
    base = f"{tag}-base"
    stub.Prepare(
        pb.PrepareSnapshotRequest(snapshotter=sn, key=base + "-k", labels=root), metadata=md
    )
    stub.Commit(
        pb.CommitSnapshotRequest(snapshotter=sn, name=base, key=base + "-k", labels=root),
        metadata=md,
    )
    samples: dict[str, list[float]] = {"Prepare": [], "Commit": [], "Stat": []}

    def clock(name: str, fn: Callable[[], object]) -> None:
        t = time.perf_counter()
        fn()
        samples[name].append((time.perf_counter() - t) * 1e3)

    for i in range(ops):
        key, name = f"{tag}-k{i}", f"{tag}-n{i}"
        clock(
            "Prepare",
            lambda key=key: stub.Prepare(
                pb.PrepareSnapshotRequest(snapshotter=sn, key=key, parent=base, labels=root),
                metadata=md,
            ),
        )
        clock(
            "Commit",
            lambda key=key, name=name: stub.Commit(
                pb.CommitSnapshotRequest(snapshotter=sn, name=name, key=key, labels=root),
                metadata=md,
            ),
        )
        clock(
            "Stat",
            lambda name=name: stub.Stat(
                pb.StatSnapshotRequest(snapshotter=sn, key=name), metadata=md
            ),
        )
    for i in range(ops):
        stub.Remove(pb.RemoveSnapshotRequest(snapshotter=sn, key=f"{tag}-n{i}"), metadata=md)
    stub.Remove(pb.RemoveSnapshotRequest(snapshotter=sn, key=base), metadata=md)
    return {
        k: {
            "p50_ms": percentile(v, 50),
            "p99_ms": percentile(v, 99),
            "mean_ms": statistics.fmean(v),
        }
        for k, v in samples.items()
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=7, help="pull+run trials per snapshotter")
    ap.add_argument("--ops", type=int, default=1000, help="Prepare/Commit/Stat per series")
    common.add_output_args(ap, "snapshotter")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench_snapshotter.py needs root (containerd, runc, overlay mounts)")

    import grpc

    work = make_tempdir("sgz-bench-")
    result: dict[str, object] = {
        "benchmark": "snapshotter",
        "date": common.now_utc(),
        "machine": common.machine(containerd=common.tool_version(["containerd", "--version"])),
        "params": {"trials": args.trials, "ops": args.ops},
    }
    try:
        with (
            Registry.start() as reg,
            StargzDaemon.start(log_level="debug") as sd,  # per-call durations
            Containerd.start(sd.address) as c,
        ):
            ref = reg.push_oci(multi_layer_image(work), "1", "multi:1")
            man = find_manifest(work / "multi", "1")
            result["image"] = {
                "layers": len(man["layers"]),
                "compressed_bytes": sum(d["size"] for d in man["layers"]),
            }
            print(f"pull + unpack + run, {args.trials} trials (+1 warm-up) per snapshotter ...")
            result["pull_unpack_run"] = pull_run(c, sd, ref, args.trials)

            print(f"Prepare/Commit/Stat latency, {args.ops} each ...")
            lat: dict[str, object] = {}
            with grpc.insecure_channel(f"unix:{sd.address}") as ch:
                lat["daemon_socket"] = latency(pb_grpc.SnapshotsStub(ch), "", args.ops, "direct")
            with grpc.insecure_channel(f"unix:{c.address}") as ch:
                stub = pb_grpc.SnapshotsStub(ch)
                for s in random.sample(SNAPSHOTTERS, 2):
                    lat[f"containerd_{s}"] = latency(stub, s, args.ops, f"via-{s}")
            result["latency"] = lat
    finally:
        shutil.rmtree(work, ignore_errors=True)

    pr = result["pull_unpack_run"]
    headline = {
        "total_s_median": {sn: round(pr[sn]["total"]["median"], 3) for sn in SNAPSHOTTERS},
        "prepare_p50_ms": {
            where: round(ops["Prepare"]["p50_ms"], 2) for where, ops in result["latency"].items()
        },
    }
    path = common.save(args, result, headline)
    print_summary(result)
    print(f"wrote {path}")


def print_summary(r: dict) -> None:
    pr = r["pull_unpack_run"]
    print(f"\nimage: {r['image']['layers']} layers, {r['image']['compressed_bytes']} bytes")
    print(f"{'seconds':<12}{'overlayfs med':>14}{'p95':>8}{'stargz med':>12}{'p95':>8}{'ratio':>8}")
    for step in ("pull", "run", "total"):
        o, s = pr["overlayfs"][step], pr["stargz"][step]
        print(
            f"{step:<12}{o['median']:>14.3f}{o['p95']:>8.3f}{s['median']:>12.3f}{s['p95']:>8.3f}"
            f"{s['median'] / o['median']:>8.3f}"
        )
    d = pr["stargz_daemon_ms_per_pull_run"]
    print(
        f"time inside the daemon per stargz pull+run: median {d['median']:.1f} ms "
        f"(p95 {d['p95']:.1f}) over {pr['stargz_daemon_calls_per_pull_run']:.0f} calls"
    )
    print(f"\n{'latency ms':<28}{'Prepare p50/p99':>18}{'Commit p50/p99':>18}{'Stat p50/p99':>16}")
    for where, ops in r["latency"].items():
        cells = [
            f"{ops[k]['p50_ms']:.2f}/{ops[k]['p99_ms']:.2f}" for k in ("Prepare", "Commit", "Stat")
        ]
        print(f"{where:<28}{cells[0]:>18}{cells[1]:>18}{cells[2]:>16}")


if __name__ == "__main__":
    main()
