"""Lazy pull of a many-layer image with and without neighbour pre-resolve, same run.

containerd prepares an image's layers one after the other; with ``resolve_neighbours``
(`stargz.fs.neighbours`) the first remote Prepare starts resolving the other layers and
fetching their TOCs, so the later Prepares find them there. This times what a user
waits for: ``ctr-remote i rpull --plain-http`` of a 12-layer eStargz image (made from
generated text files by our converter; 20-2000 files per layer, 4350 in all, 1 MB
compressed), from rpull's start to its exit (every layer's snapshot prepared and
committed), through a real containerd 1.6 and a real docker-registry, for:

- ``ours-on``: our daemon, ``resolve_neighbours = true`` (the default);
- ``ours-off``: our daemon, ``resolve_neighbours = false`` (one layer after the other);
- ``go``: the Go daemon (``../shared/tools/go-peer``, v0.12; it always pre-resolves), if
  its binary is there (``--go-bin``; skipped otherwise, and said so in the result).

Each trial starts a fresh daemon (empty cache: each TOC comes from the registry) and a
fresh containerd, rpulls a one-layer warm-up image (our daemon loads its HTTP client,
about 0.25 s of imports here, on its first lazy layer: a cost of a daemon's first pull,
not of this image's; recorded as ``warmup_rpull_s``), then the timed image. Prefetch and
background fetch are off in both daemons (the label's 10 MiB prefetch would otherwise
compete for the link). Contenders take turns in a shuffled order every round. ``--net``
lists the network conditions: ``off`` (loopback) and ``ONE_WAY_DELAY_MS:RATE`` through
``../shared/tools/netem`` on the registry's port (RTT = 2 x delay). The registry's access
log gives the layer blob GETs per trial.

    python -m benchmarks.bench_neighbours [--trials 9] [--net off,10:200mbit]

Writes ``results/neighbours.json``: per net and contender the rpull seconds (median,
p95, p99, min, max) and the ratio ``ours-on / ours-off`` (and ``ours-on / go``) of the
medians. Never asserts.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.common import log
from benchmarks.peer import GO_BIN, NO_FETCH, GoDaemon, netem
from tests.harness import Containerd, Registry, StargzDaemon, make_tempdir, run
from tests.harness.oci import build_image, find_manifest

NS = "bench"
#: Files per layer (each file 0.5-25 KB of compressible text): TOCs from a few hundred
#: bytes to ~40 KB compressed, so some layers open with the resolve probe alone and some
#: need a second request.
LAYER_FILES = (300, 40, 900, 120, 60, 2000, 30, 200, 80, 500, 20, 100)
CONTENDERS = ("ours-on", "ours-off", "go")


def build(work: Path) -> tuple[Path, list[dict[str, Any]]]:
    """The image as an OCI layout (tag ``esgz``) and its layer descriptors; tag
    ``warmup`` is a one-layer image of other files."""
    from stargz.image.convert import ConvertOptions, convert

    layers = []
    for i, n in enumerate(LAYER_FILES):
        layers.append(
            {
                f"app{i:02d}/d{j % 16:02d}/f{j:05d}.txt": (
                    f"layer {i} file {j} " * (20 + (j * 37) % 1000)
                ).encode()
                for j in range(n)
            }
        )
    out = work / "layout"
    build_image(out, "orig", layers)
    convert(f"oci:{out}:orig", f"oci:{out}:esgz", ConvertOptions())
    build_image(out, "warmup-orig", [{"warm/up.txt": b"warm up\n" * 100}])
    convert(f"oci:{out}:warmup-orig", f"oci:{out}:warmup", ConvertOptions())
    return out, list(find_manifest(out, "esgz")["layers"])  # type: ignore[call-overload]


def start_daemon(contender: str, reg: Registry, go_bin: str) -> Any:
    if contender == "go":
        return GoDaemon.start(go_bin, reg.host, extra_toml=NO_FETCH)
    on = "true" if contender == "ours-on" else "false"
    return StargzDaemon.start(
        make_tempdir("sgz-nb-"),
        config_text=NO_FETCH + f"resolve_neighbours = {on}\n[fuse]\npassthrough = false\n",
        log_level="info",
    )


def layer_gets(reg: Registry, digests: set[str]) -> int:
    return sum(1 for r in reg.blob_requests() if r.method == "GET" and r.digest in digests)


def trial(
    contender: str, refs: tuple[str, str], reg: Registry, digests: set[str], go_bin: str
) -> dict:
    snap = start_daemon(contender, reg, go_bin)
    cd = None
    warmup, ref = refs
    try:
        cd = Containerd.start(snap.address)
        rpull = ["ctr-remote", "-a", cd.address, "-n", NS, "i", "rpull", "--plain-http"]
        t0 = time.perf_counter()
        run([*rpull, warmup])
        out: dict[str, Any] = {"warmup_rpull_s": time.perf_counter() - t0}
        g0 = layer_gets(reg, digests)
        t0 = time.perf_counter()
        run([*rpull, ref])
        out["rpull_s"] = time.perf_counter() - t0
        time.sleep(0.3)  # (the registry writes a log line once its answer is complete)
        out["layer_gets"] = layer_gets(reg, digests) - g0
        if isinstance(snap, StargzDaemon):
            recs = snap.log_records()
            out["remote_prepared"] = sum(
                1 for r in recs if r.get("msg") == "layer mounted" and r.get("layer") in digests
            )
            out["mount_s_sum"] = round(
                sum(
                    r["seconds"]
                    for r in recs
                    if r.get("msg") == "layer mounted" and r.get("layer") in digests
                ),
                4,
            )
        return out
    finally:
        if cd is not None:
            cd.close()
        snap.close()


def summarize(doc: dict) -> dict:
    out: dict = {}
    for net in doc["params"]["net"].split(","):
        per: dict = {}
        for c in CONTENDERS:
            xs = [
                t["rpull_s"]
                for t in doc["trials"]
                if t["net"] == net and t["contender"] == c and "rpull_s" in t
            ]
            if xs:
                per[c] = {"rpull_s": common.summary(xs, 4)}
                gets = [
                    t["layer_gets"]
                    for t in doc["trials"]
                    if t["net"] == net and t["contender"] == c and "layer_gets" in t
                ]
                per[c]["layer_gets"] = sorted(set(gets))
        for other in ("ours-off", "go"):
            if "ours-on" in per and other in per:
                per[f"ratio_ours_on_to_{other.replace('-', '_')}"] = round(
                    per["ours-on"]["rpull_s"]["median"] / per[other]["rpull_s"]["median"], 3
                )
        out[net] = per
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=9)
    ap.add_argument("--net", default="off,10:200mbit", help="off or DELAY_MS:RATE, ...")
    ap.add_argument("--go-bin", default=GO_BIN)
    ap.add_argument("--seed", type=int, default=0)
    common.add_output_args(ap, "neighbours")
    args = ap.parse_args(argv)
    nets = [n for n in args.net.split(",") if n]
    now = _dt.datetime.now(_dt.UTC)
    rng = random.Random(args.seed or int(now.timestamp()))
    contenders = [c for c in CONTENDERS if c != "go" or os.access(args.go_bin, os.X_OK)]
    t_start = time.perf_counter()
    doc: dict = {
        "benchmark": "neighbours",
        "date": now.isoformat(timespec="seconds"),
        "machine": common.machine(ctr_remote=common.tool_version(["ctr-remote", "--version"])),
        "method": __doc__.strip().splitlines()[0],
        "params": vars(args),
        "contenders": contenders,
        "notes": [
            "rpull_s: ctr-remote i rpull wall time, start to exit (all snapshots prepared), "
            "after a warm-up rpull of a one-layer image on the same daemon",
            "noprefetch + no_background_fetch in both daemons; a fresh daemon and containerd "
            "per trial; ours with [fuse] passthrough = false",
            "layer_gets: layer blob GETs the registry logged during the rpull (distinct "
            "values over the trials)",
            "go skipped: no binary at --go-bin" if "go" not in contenders else "",
        ],
        "trials": [],
    }
    work = make_tempdir("sgz-nb-img-")
    layout, layers = build(work)
    digests = {d["digest"] for d in layers}
    doc["image"] = {
        "layers": len(layers),
        "compressed_bytes": sum(d["size"] for d in layers),
        "files": sum(LAYER_FILES),
    }
    log(json.dumps(doc["image"]))

    def save() -> None:
        doc["summary"] = summarize(doc)
        doc["wall_s"] = round(time.perf_counter() - t_start, 1)
        common.checkpoint(args, doc)

    with Registry.start(make_tempdir("sgz-nbreg-"), access_log=True) as reg:
        refs = (
            reg.push_oci(layout, "warmup", "warmup:esgz"),
            reg.push_oci(layout, "esgz", "neighbours:esgz"),
        )
        for net in nets:
            if net != "off":
                delay, rate = net.split(":")
                netem("on", reg.port, float(delay), rate)
            try:
                for r in range(args.trials):
                    order = list(contenders)
                    rng.shuffle(order)
                    for c in order:
                        try:
                            t = trial(c, refs, reg, digests, args.go_bin)
                        except Exception as e:  # record and go on
                            t = {"error": repr(e)[-2000:]}
                        t.update(contender=c, net=net, round=r, loadavg=os.getloadavg()[0])
                        doc["trials"].append(t)
                        log(json.dumps(t))
                        save()
            finally:
                if net != "off":
                    netem("off", reg.port)
    save()
    summ = doc["summary"]
    headline = {
        net: {k: (v["rpull_s"]["median"] if isinstance(v, dict) else v) for k, v in per.items()}
        for net, per in summ.items()
    }
    path = common.save(args, doc, headline)
    print(json.dumps(summ, indent=1))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
