"""Registry-to-registry image tools: ours (no containerd) vs Go's ``ctr-remote`` chain.

Both sides start from the same ordinary image in a local docker-registry and end with the
new image in that registry, so each is timed for the whole job a user runs:

* **convert**: Go needs containerd: ``ctr-remote i pull`` + ``i convert --oci --estargz``
  + ``i push`` (its content store is emptied before each trial, so every trial downloads);
  ours is one ``stargz convert SRC DST``, at gzip level 1 (ISA-L, the fastest) and at
  our default level 5 (Go's output size), against Go at its default level 9 (the same
  levels for optimize).
* **optimize**: a busybox + Python standard library image and a workload that reads part
  of the library. Go: ``ctr-remote i pull`` + ``i optimize --oci`` + ``i push``; ours:
  ``stargz optimize SRC DST``. Reported with the bytes each result prefetches (the layer
  bytes before ``.prefetch.landmark``) and the files each put first.

Each trial pushes to a new repository, so no blob is skipped by a HEAD the earlier trial
answered (the registry still stores each blob once). Trials run every contender once in a
shuffled order; medians and p99 are reported with the load at each run.

    python -m benchmarks.bench_image_tools [--trials 3] [--parts convert,optimize]

Writes ``results/image-tools.json`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks import common
from benchmarks._images import existing, extend_image, make_layout
from stargz.estargz import open_file
from stargz.estargz.toc import PREFETCH_LANDMARK
from tests.harness.procs import Containerd, Registry, StargzDaemon, run, shared_dir

NS = "bench"
TREES = existing(["/usr/lib/python3.11", "/usr/lib/x86_64-linux-gnu/perl", "/usr/share/perl"])
SCRIPT = "cat /etc/greeting; ls /bin | wc -l; cat /usr/lib/python3.11/json/*.py | wc -c"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TOC_KEY = "containerd.io/snapshot/stargz/toc.digest"


def stargz(*args: str) -> None:
    run([sys.executable, "-m", "stargz.cli.main", *args], timeout=3600)


def ctr_remote(cd: Containerd, *args: str) -> None:
    run(["ctr-remote", "-a", cd.address, "-n", NS, *args], timeout=3600)


def manifest_of(reg: Registry, ref: str) -> dict:
    repo, tag = ref.split("/", 1)[1].rsplit(":", 1)
    req = urllib.request.Request(
        f"http://{reg.host}/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def layers_size(reg: Registry, ref: str) -> int:
    return sum(x["size"] for x in manifest_of(reg, ref)["layers"])


def prefetch(reg: Registry, ref: str) -> tuple[int, list[list[str]]]:
    """(bytes before each layer's ``.prefetch.landmark``, summed; the regular files
    before it, per layer)."""
    total, lists = 0, []
    for layer in manifest_of(reg, ref)["layers"]:
        with open_file(str(reg.blob_file(layer["digest"]))) as r:
            entries = list(r.toc.entries)
        names = [e.name for e in entries]
        if PREFETCH_LANDMARK not in names:
            lists.append([])
            continue
        i = names.index(PREFETCH_LANDMARK)
        total += entries[i].offset
        lists.append([e.name for e in entries[:i] if e.type == "reg"])
    return total, lists


def empty_store(cd: Containerd) -> None:
    """Remove every image of the namespace; GC then drops their content."""
    names = [x for x in cd.ctr("i", "ls", "-q", ns=NS).stdout.split() if x]
    if names:
        cd.ctr("i", "rm", "--sync", *names, ns=NS, check=False)


def go_convert(cd: Containerd, src: str, dst: str) -> None:
    ctr_remote(cd, "i", "pull", "--plain-http", src)
    ctr_remote(cd, "i", "convert", "--oci", "--estargz", src, dst)
    ctr_remote(cd, "i", "push", "--plain-http", dst)


def go_optimize(cd: Containerd, src: str, dst: str) -> None:
    ctr_remote(cd, "i", "pull", "--plain-http", src)
    ctr_remote(
        cd,
        *("i", "optimize", "--oci", "--period", "20", "--entrypoint", '["/bin/sh","-c"]'),
        *("--args", json.dumps([SCRIPT]), src, dst),
    )
    ctr_remote(cd, "i", "push", "--plain-http", dst)


def our_convert(level: str):
    def job(cd: Containerd, src: str, dst: str) -> None:
        flags = [] if level == "default" else ["--compression-level", level]
        stargz("convert", "-q", *flags, src, dst)

    return job


def our_optimize(level: str):
    def job(cd: Containerd, src: str, dst: str) -> None:
        flags = [] if level == "default" else ["--compression-level", level]
        stargz(
            *("optimize", "-q", *flags, "--period", "20"),
            *("--entrypoint", '["/bin/sh","-c"]', "--args", json.dumps([SCRIPT]), src, dst),
        )

    return job


def trial_runs(
    part: str, contenders: dict, cd: Containerd, reg: Registry, src: str, trials: int, rng
) -> dict:
    results: dict[str, dict] = {}
    for t in range(trials):
        order = list(contenders)
        rng.shuffle(order)
        for who in order:
            empty_store(cd)
            dst = reg.ref(f"{part}-{who}-{t}:1")
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            contenders[who](cd, src, dst)
            secs = time.perf_counter() - t0
            r = results.setdefault(who, {"seconds": [], "load": []})
            r["seconds"].append(round(secs, 3))
            r["load"].append(round(load, 2))
            r["output_bytes"] = layers_size(reg, dst)
            if part == "optimize":
                r["prefetch_bytes"], r["prefetch_files"] = prefetch(reg, dst)
            for layer in manifest_of(reg, dst)["layers"]:
                assert TOC_KEY in (layer.get("annotations") or {}), (who, layer)
            print(f"{part} trial {t} {who}: {secs:.2f}s load {load:.2f}", file=sys.stderr)
    for r in results.values():
        r["summary"] = common.summary(r["seconds"], 3)
    return results


def table(results: dict, go: str) -> str:
    g = results[go]
    rows = [
        "| contender | median (p99) | vs Go | output | vs Go size | prefetch |",
        "|---|---|---|---|---|---|",
    ]
    for who, r in results.items():
        s = r["summary"]
        pf = f"{r['prefetch_bytes'] / 1e6:.2f} MB" if "prefetch_bytes" in r else "-"
        rows.append(
            f"| {who} | {s['median']:.2f} s ({s['p99']:.2f}) "
            f"| {s['median'] / g['summary']['median']:.2f}x "
            f"| {r['output_bytes'] / 1e6:.2f} MB "
            f"| {100 * (r['output_bytes'] / g['output_bytes'] - 1):+.1f}% | {pf} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--parts", default="convert,optimize")
    ap.add_argument("--seed", type=int, default=1)
    common.add_output_args(ap, "image-tools")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    rng = random.Random(args.seed)
    base = Path(tempfile.mkdtemp(prefix="bench-image-tools-"))
    load_before = [round(x, 2) for x in os.getloadavg()]
    doc: dict = {
        "benchmark": "image-tools",
        "machine": common.machine(loadavg_at_start=load_before),
        "trials": args.trials,
        "parts": {},
    }
    try:
        (base / "reg").mkdir()
        (base / "sd").mkdir()
        (base / "cd").mkdir()
        with (
            Registry.start(base / "reg") as reg,
            # Go's optimizer runs its workload on containerd's overlayfs snapshotter; the
            # daemon only satisfies the proxy plugin entry (nothing is pulled lazily here)
            StargzDaemon.start(base / "sd", extra_args=["--no-lazy"]) as sd,
            Containerd.start(sd.address, base / "cd") as cd,
        ):
            if "convert" in parts:
                layout = base / "convert-image"
                sizes = make_layout(str(layout), "orig", [[t] for t in TREES])
                src = reg.push_oci(layout, "orig", "convert-src:1")
                contenders = {
                    "go-level9": go_convert,
                    "ours-level1": our_convert("1"),
                    "ours-level5": our_convert("5"),
                }
                res = trial_runs("convert", contenders, cd, reg, src, args.trials, rng)
                doc["parts"]["convert"] = {
                    "input": {"trees": TREES, **sizes},
                    "results": res,
                    "table_markdown": table(res, "go-level9"),
                }
                print(doc["parts"]["convert"]["table_markdown"])
            if "optimize" in parts:
                layout = base / "optimize-image"
                shutil.copytree(shared_dir() / "fixtures" / "oci-busybox", layout)
                os.chmod(layout, 0o755)
                for p in layout.rglob("*"):
                    os.chmod(p, 0o755 if p.is_dir() else 0o644)
                extra = extend_image(str(layout), "1", "orig", ["/usr/lib/python3.11"])
                src = reg.push_oci(layout, "orig", "optimize-src:1")
                contenders = {
                    "go": go_optimize,
                    "ours-level1": our_optimize("1"),
                    "ours-level5": our_optimize("5"),
                }
                res = trial_runs("optimize", contenders, cd, reg, src, args.trials, rng)
                doc["parts"]["optimize"] = {
                    "input": {"image": "busybox + /usr/lib/python3.11", **extra},
                    "workload": SCRIPT,
                    "results": res,
                    "same_prefetch_files": all(
                        r["prefetch_files"] == res["go"]["prefetch_files"] for r in res.values()
                    ),
                    "table_markdown": table(res, "go"),
                }
                print(doc["parts"]["optimize"]["table_markdown"])
    finally:
        subprocess.run(["umount", "-R", "-l", str(base)], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)
    headline = {
        part: {who: r["summary"]["median"] for who, r in d["results"].items()}
        for part, d in doc["parts"].items()
    }
    path = common.save(args, doc, headline)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
