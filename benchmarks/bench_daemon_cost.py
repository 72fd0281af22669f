"""Daemon memory and CPU: our snapshotter vs Go's, one run, one registry on 127.0.0.1.

a. RSS per TOC entry (prefetch and background fetch OFF in both daemons, so only the
   TOC / index of a mounted layer is measured). Images: ``many-files`` (one layer, 1000
   dirs x 100 files of 100 bytes, built once under /var/cache/stargz-bench/many-files/)
   and the HelloBench ``python`` image (~8k entries). Both daemons mount the SAME eStargz
   blob, converted by ``stargz convert`` (both read any eStargz). Per trial: fresh daemon +
   containerd; RSS idle (1 s after start), after ``ctr-remote i rpull`` (settle 1 s), after
   ``os.walk`` + ``lstat`` of the whole tree through a view mount (settle 1 s). With
   ``--cycles N`` > 1 the image is then removed (``ctr i rm --sync``: containerd's GC
   removes the snapshots, the daemon unmounts the layer) and pulled + walked again, N
   times in all, in the same daemon: RSS per cycle shows whether memory comes back.
b. CPU per GB fetched with background fetch ON (both daemons' defaults): rpull the HelloBench
   ``gcc`` image (ours-noopt for ours, go-noopt for Go), then wait until, for ``--idle``
   s, the registry has sent no more bytes of the layer blob (its access log) AND the daemon
   has used no CPU (so decode, verify and cache writes after the download are counted).
   Reported: daemon CPU seconds (from before rpull) per GB of compressed bytes the
   registry sent; wall time to the last byte (``last_byte_s``) and to the end of the
   daemon's work on it (``full_fetch_s``). Loopback and, with ``--net``, behind
   ../shared/tools/netem.

Each round runs every case once, shuffled. Part a's result is
``results/daemon-cost-memory.json``, part b's ``results/daemon-cost-fetch.json`` (each
with its history line); the run in progress is saved after every trial to
``results/daemon-cost.partial.json``.

    python -m benchmarks.bench_daemon_cost [--trials 3] [--cycles 3]
        [--net off,5:200mbit] [--parts a,b]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

from benchmarks import common
from benchmarks._many_files import build_many_files, toc_entries
from benchmarks.common import CACHE, log, percentile, proc_usage
from benchmarks.hellobench.images import layers_of
from benchmarks.peer import GO_BIN, NO_FETCH, GoDaemon, netem, registry_bytes
from tests.harness.procs import (
    Containerd,
    Registry,
    StargzDaemon,
    make_tempdir,
    mounted_image,
    run,
)

NS = "dc"


# ---------------------------------------------------------------- measuring


def start_daemon(contender: str, reg: Registry, go_bin: str, no_fetch: bool):
    if contender == "ours":
        return StargzDaemon.start(
            make_tempdir("sgz-dc-"),
            config_text=NO_FETCH if no_fetch else "",
            log_level="info",
        )
    return GoDaemon.start(go_bin, reg.host, extra_toml=NO_FETCH if no_fetch else "")


def walk(root: Path) -> int:
    n = 0
    for dp, dns, fns in os.walk(root):
        for name in dns + fns:
            os.lstat(os.path.join(dp, name))
            n += 1
    return n


def trial_rss(contender: str, image: str, ref: str, reg: Registry, go_bin: str, cycles: int):
    res: dict = {"part": "a", "contender": contender, "image": image, "cycles": []}
    snap = start_daemon(contender, reg, go_bin, no_fetch=True)
    cd = None
    try:
        cd = Containerd.start(snap.address)
        time.sleep(1)
        res["idle"] = proc_usage(snap.pid)
        a = ["-a", cd.address, "-n", NS]
        for c in range(cycles):
            cyc: dict = {}
            b0 = registry_bytes(reg)
            t0 = time.perf_counter()
            run(["ctr-remote", *a, "i", "rpull", "--plain-http", ref], timeout=1800)
            cyc["rpull_s"] = time.perf_counter() - t0
            time.sleep(1)
            cyc["mounted"] = proc_usage(snap.pid)
            with mounted_image(cd, ref, NS, "stargz") as root:
                t0 = time.perf_counter()
                cyc["walked_entries"] = walk(root)
                cyc["walk_s"] = time.perf_counter() - t0
                time.sleep(1)
                cyc["walked"] = proc_usage(snap.pid)
            cyc["registry_bytes"] = registry_bytes(reg) - b0
            if c + 1 < cycles:
                run(["ctr", *a, "i", "rm", "--sync", ref], timeout=600)
                time.sleep(1)
                cyc["removed"] = proc_usage(snap.pid)
            res["cycles"].append(cyc)
        return res
    finally:
        if cd:
            cd.close()
        snap.close()


def trial_cpu(contender: str, ref: str, digest: str, size: int, reg: Registry, args) -> dict:
    res: dict = {"part": "b", "contender": contender, "blob_bytes": size}
    snap = start_daemon(contender, reg, args.go_bin, no_fetch=False)
    cd = None
    try:
        cd = Containerd.start(snap.address)
        time.sleep(1)
        u0 = proc_usage(snap.pid)
        b0 = reg.blob_bytes(digest)
        a = ["-a", cd.address, "-n", NS]
        t0 = time.perf_counter()
        run(["ctr-remote", *a, "i", "rpull", "--plain-http", ref], timeout=1800)
        res["rpull_s"] = time.perf_counter() - t0
        t_rpulled = time.perf_counter()
        timeline: list[tuple[float, int, float, int]] = []  # (s, bytes, cpu_s, rss)
        n, cpu = 0, u0["cpu_s"]
        byte_t = busy_t = t0  # when registry bytes / daemon CPU last grew
        done = "timeout"
        while time.perf_counter() - t0 < args.fetch_timeout:
            time.sleep(0.5)
            now = time.perf_counter()
            n_new = reg.blob_bytes(digest) - b0
            u = proc_usage(snap.pid)
            timeline.append((round(now - t0, 2), n_new, u["cpu_s"], u["rss_bytes"]))
            if n_new != n:
                byte_t = now
            if u["cpu_s"] - cpu >= 0.03:  # an idle daemon ticks ~0.01 s in seconds
                busy_t = now
            n, cpu = n_new, u["cpu_s"]
            # Go starts background fetch 5 s after the last foreground task: no end
            # before --min-wait after rpull unless the whole blob has been sent.
            if (
                (n >= size or now - t_rpulled >= args.min_wait)
                and now - byte_t >= args.idle
                and now - busy_t >= args.idle
            ):
                done = "complete" if n >= size else "idle"
                break
        u1 = proc_usage(snap.pid)
        res.update(
            end=done,
            fetched_bytes=n,
            last_byte_s=byte_t - t0,
            # the layer's bytes are in AND the daemon has stopped working on them
            # (decode, verify, cache write): the last byte alone undercounts a daemon
            # that buffers the download and decodes afterwards
            full_fetch_s=max(byte_t, busy_t) - t0,
            cpu_s=u1["cpu_s"] - u0["cpu_s"],
            rss_before=u0["rss_bytes"],
            rss_after=u1["rss_bytes"],
            rss_hwm=u1.get("VmHWM"),
            mem_before=u0,
            mem_after=u1,
        )
        res["cpu_s_per_gb"] = res["cpu_s"] / (n / 1e9) if n > 0 else None
        for _ in range(int(args.linger)):  # does the memory come back?
            time.sleep(1)
            u = proc_usage(snap.pid)
            timeline.append((round(time.perf_counter() - t0, 2), n, u["cpu_s"], u["rss_bytes"]))
        res["timeline_s_bytes_cpu_rss"] = timeline
        res["cpu_s_per_gb_of_blob"] = res["cpu_s"] / (size / 1e9)
        if isinstance(snap, StargzDaemon):  # our own completeness record, for the record
            res["ours_logged_fully_fetched"] = "layer fully fetched" in snap.log_text()
        return res
    finally:
        if cd:
            cd.close()
        snap.close()


# ---------------------------------------------------------------- report


def med_p95(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {}
    return {"median": statistics.median(xs), "p95": percentile(xs, 95), "n": len(xs)}


def summarize(doc: dict) -> dict:
    out: dict = {"a": {}, "b": {}}
    ok = [t for t in doc["trials"] if "error" not in t]
    for img, info in doc.get("images_a", {}).items():
        per = {}
        for c in ("ours", "go"):
            ts = [t for t in ok if t["part"] == "a" and t["image"] == img and t["contender"] == c]
            if not ts:
                continue
            ent = info["toc_entries"]

            def mb(f, ts=ts):
                return med_p95([f(t) / 1e6 for t in ts])

            per[c] = {
                "rss_idle_MB": mb(lambda t: t["idle"]["rss_bytes"]),
                "rss_mounted_MB": mb(lambda t: t["cycles"][0]["mounted"]["rss_bytes"]),
                "rss_walked_MB": mb(lambda t: t["cycles"][0]["walked"]["rss_bytes"]),
                "mount_growth_MB_per_100k_entries": mb(
                    lambda t, ent=ent: (
                        (t["cycles"][0]["mounted"]["rss_bytes"] - t["idle"]["rss_bytes"])
                        * 1e5
                        / ent
                    )
                ),
                "walk_growth_MB_per_100k_entries": mb(
                    lambda t, ent=ent: (
                        (
                            t["cycles"][0]["walked"]["rss_bytes"]
                            - t["cycles"][0]["mounted"]["rss_bytes"]
                        )
                        * 1e5
                        / ent
                    )
                ),
                "total_growth_MB_per_100k_entries": mb(
                    lambda t, ent=ent: (
                        (t["cycles"][0]["walked"]["rss_bytes"] - t["idle"]["rss_bytes"]) * 1e5 / ent
                    )
                ),
                "rpull_s": med_p95([t["cycles"][0]["rpull_s"] for t in ts]),
                "walk_s": med_p95([t["cycles"][0]["walk_s"] for t in ts]),
                "registry_MB_first_mount": mb(lambda t: t["cycles"][0]["registry_bytes"]),
            }
            ncyc = min(len(t["cycles"]) for t in ts)
            if ncyc > 1:
                per[c]["rss_walked_MB_by_cycle"] = [
                    statistics.median(t["cycles"][i]["walked"]["rss_bytes"] / 1e6 for t in ts)
                    for i in range(ncyc)
                ]
                per[c]["rss_removed_MB_by_cycle"] = [
                    statistics.median(t["cycles"][i]["removed"]["rss_bytes"] / 1e6 for t in ts)
                    for i in range(ncyc - 1)
                ]
        if "ours" in per and "go" in per:
            per["ratios_ours_over_go"] = {
                k: per["ours"][k]["median"] / per["go"][k]["median"]
                for k in (
                    "rss_idle_MB",
                    "rss_walked_MB",
                    "mount_growth_MB_per_100k_entries",
                    "total_growth_MB_per_100k_entries",
                    "rpull_s",
                    "walk_s",
                )
                if per["go"][k].get("median")
            }
        out["a"][img] = {"toc_entries": info["toc_entries"], **per}
    for net in {t["net"] for t in ok if t["part"] == "b"}:
        per = {}
        for c in ("ours", "go"):
            ts = [t for t in ok if t["part"] == "b" and t["net"] == net and t["contender"] == c]
            if not ts:
                continue
            per[c] = {
                "cpu_s_per_gb": med_p95([t["cpu_s_per_gb"] for t in ts]),
                "cpu_s_per_gb_of_blob": med_p95([t["cpu_s_per_gb_of_blob"] for t in ts]),
                "cpu_s": med_p95([t["cpu_s"] for t in ts]),
                "full_fetch_s": med_p95([t["full_fetch_s"] for t in ts]),
                "last_byte_s": med_p95([t["last_byte_s"] for t in ts]),
                "fetched_MB": med_p95([t["fetched_bytes"] / 1e6 for t in ts]),
                "blob_MB": ts[0]["blob_bytes"] / 1e6,
                "rss_after_MB": med_p95([t["rss_after"] / 1e6 for t in ts]),
                "rss_peak_MB": med_p95([(t["rss_hwm"] or 0) / 1e6 or None for t in ts]),
                "ends": sorted(t["end"] for t in ts),
            }
        if "ours" in per and "go" in per:
            per["ratios_ours_over_go"] = {
                k: per["ours"][k]["median"] / per["go"][k]["median"]
                for k in (
                    "cpu_s_per_gb",
                    "cpu_s",
                    "full_fetch_s",
                    "last_byte_s",
                    "rss_after_MB",
                    "rss_peak_MB",
                )
                if per["go"][k].get("median")
            }
        out["b"][net] = per
    return out


#: Result name of each part.
PART_NAMES = {"a": "daemon-cost-memory", "b": "daemon-cost-fetch"}


def part_headline(part: str, summ: dict) -> dict:
    """Part a: RSS growth per 100k entries and idle RSS; part b: CPU s per GB, RSS peak."""
    keys = {
        "a": (
            "mount_growth_MB_per_100k_entries",
            "total_growth_MB_per_100k_entries",
            "rss_idle_MB",
        ),
        "b": ("cpu_s_per_gb", "full_fetch_s", "rss_peak_MB"),
    }[part]
    out: dict = {}
    for case, per in summ[part].items():
        for c in ("ours", "go"):
            if c in per:
                out.setdefault(case, {})[c] = {
                    k: round(per[c][k]["median"], 2) for k in keys if per[c][k].get("median")
                }
        if "toc_entries" in per:
            out.setdefault(case, {})["toc_entries"] = per["toc_entries"]
    return out


def save_parts(args: argparse.Namespace, doc: dict) -> list[Path]:
    """One result per part measured: its trials, images and summary."""
    if args.out:
        return [common.save(args, doc, {})]
    paths = []
    for part, name in PART_NAMES.items():
        if part not in {t["part"] for t in doc["trials"]}:
            continue
        d = {k: v for k, v in doc.items() if k not in ("trials", "summary", "images_a", "images_b")}
        d["benchmark"] = name
        d["trials"] = [t for t in doc["trials"] if t["part"] == part]
        d["summary"] = doc["summary"][part]
        if f"images_{part}" in doc:
            d[f"images_{part}"] = doc[f"images_{part}"]
        paths.append(common.write_result(name, d, part_headline(part, doc["summary"])))
    (common.RESULTS / f"{args.name}.partial.json").unlink(missing_ok=True)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--parts", default="a,b")
    ap.add_argument("--cycles", type=int, default=3, help="part a: pull/walk/remove cycles")
    ap.add_argument("--net", default="off,5:200mbit", help="part b: off or DELAY_MS:RATE, ...")
    ap.add_argument("--idle", type=float, default=3.0, help="part b: s without new bytes")
    ap.add_argument(
        "--min-wait", type=float, default=10.0, help="part b: s after rpull before an idle end"
    )
    ap.add_argument(
        "--linger", type=float, default=0, help="part b: s of RSS samples after the end"
    )
    ap.add_argument("--fetch-timeout", type=float, default=600.0)
    ap.add_argument("--go-bin", default=GO_BIN)
    ap.add_argument("--seed", type=int, default=0)
    common.add_output_args(ap, "daemon-cost")
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    nets = [n for n in args.net.split(",") if n]
    now = _dt.datetime.now(_dt.UTC)
    rng = random.Random(args.seed or int(now.timestamp()))
    t_start = time.perf_counter()
    doc: dict = {
        "benchmark": "daemon-cost",
        "date": now.isoformat(timespec="seconds"),
        "machine": common.machine(),
        "method": __doc__.strip().splitlines()[0],
        "params": vars(args),
        "notes": [
            "part a: noprefetch + no_background_fetch in both daemons; both mount the same "
            "blob, converted by our `stargz convert` (default settings)",
            "part a growth per 100k entries = (RSS after - RSS before) x 100000 / TOC entries "
            "(first cycle); RSS = VmRSS; Go's RSS includes its GC's slack",
            "part b: default settings (prefetch, background fetch on); gcc ours-noopt for "
            "ours, go-noopt for Go; cpu_s = daemon user+sys from before rpull until it has "
            "been idle (no new registry bytes, < 0.03 CPU s per 0.5 s) for --idle s; "
            "full_fetch_s = time of the last registry byte or last busy sample, whichever "
            "is later; last_byte_s = registry side only; fetched = blob GET body bytes the "
            "registry logged; timeline_s_bytes_cpu_rss = the 0.5 s samples",
            "Go's background fetch starts 5 s after the last on-demand/prefetch task "
            "(v0.12 BackgroundTaskManager), which is part of its full_fetch_s",
        ],
        "trials": [],
    }

    def save() -> None:
        doc["summary"] = summarize(doc)
        doc["wall_s"] = time.perf_counter() - t_start
        common.checkpoint(args, doc)

    with Registry.start(make_tempdir("sgz-dcreg-"), access_log=True) as reg:
        if "a" in parts:
            many = build_many_files()
            srcs = {
                "many-files": (many, "ours"),
                "python": (CACHE / "oci" / "python", "ours-noopt"),
            }
            doc["images_a"] = {}
            refs_a = {}
            for img, (lay, tag) in srcs.items():
                refs_a[img] = reg.push_oci(lay, tag, f"dc-{img}:{tag}")
                doc["images_a"][img] = {
                    "layout": str(lay),
                    "tag": tag,
                    "toc_entries": toc_entries(lay, tag),
                    "compressed_bytes": sum(x["size"] for x in layers_of(lay, tag)),
                }
            log(json.dumps(doc["images_a"]))
            for r in range(args.trials):
                order = [(c, i) for c in ("ours", "go") for i in srcs]
                rng.shuffle(order)
                for c, img in order:
                    try:
                        t = trial_rss(c, img, refs_a[img], reg, args.go_bin, args.cycles)
                    except Exception as e:  # record and go on
                        t = {"part": "a", "contender": c, "image": img, "error": repr(e)[-2000:]}
                    t["round"] = r
                    t["loadavg"] = os.getloadavg()
                    doc["trials"].append(t)
                    log(json.dumps(t)[:400])
                    save()
        if "b" in parts:
            gcc = CACHE / "oci" / "gcc"
            refs_b = {}
            for c, tag in (("ours", "ours-noopt"), ("go", "go-noopt")):
                layers = layers_of(gcc, tag)
                assert len(layers) == 1, "part b expects one-layer images"
                refs_b[c] = (
                    reg.push_oci(gcc, tag, f"dc-gcc:{tag}"),
                    layers[0]["digest"],
                    layers[0]["size"],
                )
            doc["images_b"] = {c: {"digest": d, "bytes": s} for c, (_r, d, s) in refs_b.items()}
            for net in nets:
                if net != "off":
                    delay, rate = net.split(":")
                    netem("on", reg.port, float(delay), rate)
                try:
                    for r in range(args.trials):
                        order = ["ours", "go"]
                        rng.shuffle(order)
                        for c in order:
                            ref, digest, size = refs_b[c]
                            try:
                                t = trial_cpu(c, ref, digest, size, reg, args)
                            except Exception as e:  # record and go on
                                t = {"part": "b", "contender": c, "error": repr(e)[-2000:]}
                            t.update(net=net, round=r, loadavg=os.getloadavg())
                            doc["trials"].append(t)
                            log(json.dumps(t)[:400])
                            save()
                finally:
                    if net != "off":
                        netem("off", reg.port)
    save()
    print(json.dumps(doc["summary"], indent=1))
    for path in save_parts(args, doc):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
