"""HelloBench side by side: legacy pull vs our stargz snapshotter vs Go's, one registry.

For each image (python, gcc, nginx, node, python-12l: python in 12 layers) and mode:

* ``legacy``     containerd's overlayfs snapshotter, ``ctr i pull`` (full pull + unpack)
* ``ours-noopt`` our daemon, eStargz from ``stargz convert``
* ``ours-opt``   our daemon, ``stargz convert --prioritized-files`` with the access list
                 taken from Go's optimized image (files before ``.prefetch.landmark``):
                 our converter on Go's profile
* ``go-noopt``   Go daemon (../shared/tools/go-peer), ``ctr-remote i convert --oci --estargz``
* ``go-opt``     Go daemon, ``ctr-remote i optimize --oci`` with the workload: Go's whole
                 chain (Go's optimizer, Go's ``ctr-remote i rpull``, Go's daemon)
* ``ours-on-go-opt`` our daemon on Go's ``go-opt`` image (pulled by ``ctr-remote i rpull``)
* ``ours-all-opt`` our whole chain: ``stargz optimize`` with the same workload, our
                 ``stargz rpull`` (its own process, as a user runs it: it asks our
                 daemon to make the pull), our daemon

and extra modes (not run unless named in ``--modes``) that separate the converter from
the snapshotter: ``ours-opt9`` is ``ours-opt`` compressed at Go's gzip level 9 instead of
our default (level 5, about Go's size); ``ours-opt-pt``
is ``ours-opt`` with ``[fuse] passthrough = true`` (off by default, as in Go); ``ours-opt-nohs`` is
``ours-opt`` with the head start off (``head_start_max_bytes = 0``: the prefetch download waits
for the TOC parse, see stargz.fs.headstart); ``ours-all-opt-wait`` is ``ours-all-opt`` with
``wait_prefetch_on_check = true`` (containerd's create waits for the prefetch, as with Go's);
``ours-opt-s1`` is ``ours-opt`` with ``head_start_streams = 1`` (the head start in one GET).

times ``pull`` (``ctr i pull`` / ``ctr-remote i rpull`` / ``stargz rpull``), ``create``
(``ctr c create``: the container's snapshot is prepared; Go's daemon waits there for the
layers' prefetch to land, ours does not unless ``wait_prefetch_on_check``, the extra mode
``ours-all-opt-wait``) and ``run`` (``ctr t start`` until the workload prints its ready
line; with ours it includes the rest of the prefetch, as a read of a prefetched file waits
for its chunks). Every trial gets a fresh
snapshotter daemon, containerd and cache; the registry (one, behind the emulated network,
shared by all modes) is the only thing kept.
Bytes fetched are counted on the registry side (its access log) up to the ready line.

The physical limit of an image and network (:func:`limits`) is what no lazy pull can beat:
the bytes ``ours-all-opt`` must fetch (manifest, config, each layer's footer + TOC and its
prefetch range up to the landmark) at the link rate, plus 5 round trips (TCP connect,
manifest, config, the layers' footers/TOCs in parallel, the prefetch ranges in parallel),
plus starting the same container from a local overlayfs snapshot (``legacy``'s create + run
after its full pull, measured in the same run).

Order: each round runs every (image, mode) once, shuffled. The run in progress is saved
after every trial (``results/hellobench.partial.json``); the finished one is
``results/hellobench.json`` (``--name`` for another name, e.g. an A/B of extra modes), and
``python -m benchmarks.hellobench.chart`` draws it. Usually run by ``bash ci/bench.sh``.

    python -m benchmarks.bench_hellobench [--images python,gcc,nginx] [--trials 5]
        [--net 5:200mbit,0.5:1000mbit] [--modes ...] [--go-bin PATH] [--name NAME]

``--net`` takes ONE_WAY_DELAY_MS:RATE pairs (RTT = 2 x delay).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time

from benchmarks import common
from benchmarks.common import CACHE, log, percentile, proc_usage
from benchmarks.hellobench.images import MODES, TAG_OF, WORKLOADS, layers_of, prepare_images
from benchmarks.peer import GO_BIN, GoDaemon, measure_net, netem, registry_bytes
from tests.harness.procs import Containerd, Daemon, Registry, StargzDaemon, make_tempdir, run

#: Longest wait for the ready line before the trial is recorded as an error.
READY_TIMEOUT_S = 300.0

#: Our CLI, from this tree (PYTHONPATH), in a process of its own.
STARGZ = [sys.executable, "-m", "stargz.cli.main"]

#: Daemon config per mode (ours): ``ours-opt-pt`` turns FUSE passthrough on,
#: ``ours-opt-nohs`` the head start off.
OURS_CONFIG = {
    "ours-opt-pt": "[fuse]\npassthrough = true\n",
    "ours-opt-nohs": "head_start_max_bytes = 0\n",
    "ours-all-opt-wait": "wait_prefetch_on_check = true\n",
    "ours-opt-s1": "head_start_streams = 1\n",
}


def mount_phases(log_text: str, message: str = "layer mounted") -> list[dict]:
    """Our daemon's "layer mounted" (or ``message``) lines: where each mount's seconds
    went."""
    out = []
    for line in log_text.splitlines():
        if f'"{message}"' in line:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            out.append({k: v for k, v in doc.items() if k.endswith("seconds") or k == "bytes"})
    return out


def trial(img: str, mode: str, ref: str, reg: Registry, go_bin: str) -> dict:
    cmd, ready = WORKLOADS[img]
    snap: Daemon | None = None
    cd: Containerd | None = None
    cid = f"hb-{img}"
    res: dict = {"image": img, "mode": mode, "load1": os.getloadavg()[0]}
    dummy = make_tempdir("sgz-dummy-")
    try:
        if mode.startswith("ours"):
            snap = StargzDaemon.start(
                make_tempdir("sgz-hb-"), config_text=OURS_CONFIG.get(mode, ""), log_level="info"
            )
            addr = snap.address
        elif mode.startswith("go"):
            snap = GoDaemon.start(go_bin, reg.host)
            addr = snap.address
        else:
            addr = str(dummy / "none.sock")
        idle = proc_usage(snap.pid) if snap else {}
        cd = Containerd.start(addr)
        a = ["-a", cd.address, "-n", "hb"]
        sn = [] if mode == "legacy" else ["--snapshotter", "stargz"]
        b0 = registry_bytes(reg)

        t0 = time.perf_counter()
        if mode == "legacy":
            run(["ctr", *a, "i", "pull", "--plain-http", ref], timeout=1800)
        elif mode.startswith("ours-all-opt"):  # our client of containerd's API, as a user runs it
            # (the daemon makes the pull, as it does for a user: its socket is not the default)
            o = run(
                [*STARGZ, "rpull", *a, "--daemon-address", addr, "--plain-http", ref],
                timeout=1800,
            ).stdout
            m = re.search(r" in ([0-9.]+)s$", o.strip())
            res["rpull_inner_s"] = float(m.group(1)) if m else None
        else:
            run(["ctr-remote", *a, "i", "rpull", "--plain-http", ref], timeout=1800)
        t1 = time.perf_counter()
        run(["ctr", *a, "c", "create", *sn, "--", ref, cid, *cmd], timeout=600)
        t2 = time.perf_counter()
        p = subprocess.Popen(
            ["ctr", *a, "t", "start", cid],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out = []
        assert p.stdout is not None
        ok = False
        # a hung start (e.g. a daemon that stopped answering FUSE) ends the trial, not the run
        guard = threading.Timer(READY_TIMEOUT_S, p.kill)
        guard.start()
        try:
            for line in p.stdout:
                out.append(line)
                if line.strip() == ready:
                    ok = True
                    break
        finally:
            guard.cancel()
        t3 = time.perf_counter()
        if not ok:
            p.wait(30)
            raise RuntimeError(
                f"no ready line; out={out!r} err={p.stderr.read() if p.stderr else ''}"
            )
        usage = proc_usage(snap.pid) if snap else {}
        if idle:  # at startup (imports, gRPC server up): idle RSS, start-up CPU
            usage["idle_rss_bytes"] = idle.get("rss_bytes")
            usage["startup_cpu_s"] = idle.get("cpu_s")
        time.sleep(0.2)  # let the registry flush the access-log lines of completed responses
        fetched = registry_bytes(reg) - b0
        if img == "nginx":
            run(["ctr", *a, "t", "kill", "-s", "SIGKILL", cid], check=False)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
        run(["ctr", *a, "t", "rm", "-f", cid], check=False)
        run(["ctr", *a, "c", "rm", cid], check=False)
        if isinstance(snap, StargzDaemon):
            res["mounts"] = mount_phases(snap.log_text())
            res["prefetches"] = mount_phases(snap.log_text(), "prefetch done")
        res.update(
            pull_s=t1 - t0,
            create_s=t2 - t1,
            run_s=t3 - t2,
            total_s=t3 - t0,
            fetched_bytes=fetched,
            daemon=usage,
        )
        return res
    finally:
        if cd:
            cd.close()
        if snap:
            snap.close()
        shutil.rmtree(dummy, ignore_errors=True)


# ---------------------------------------------------------------- report


def summarize(trials: list[dict]) -> dict:
    out: dict = {}
    for t in trials:
        if "error" in t:
            continue
        key = f"{t['net']}/{t['image']}/{t['mode']}"
        out.setdefault(key, []).append(t)
    summ = {}
    for key, ts in out.items():
        s = {"n": len(ts)}
        for f in ("pull_s", "create_s", "run_s", "total_s", "fetched_bytes"):
            xs = [t[f] for t in ts]
            s[f] = {
                "median": statistics.median(xs),
                "p95": percentile(xs, 95),
                "min": min(xs),
                "max": max(xs),
            }
        inner = [t["rpull_inner_s"] for t in ts if t.get("rpull_inner_s") is not None]
        if inner:
            s["rpull_inner_s_median"] = statistics.median(inner)
        s["load1_median"] = statistics.median(t.get("load1", 0) for t in ts)
        cpu = [t["daemon"].get("cpu_s") for t in ts if t.get("daemon", {}).get("cpu_s") is not None]
        rss = [t["daemon"].get("rss_bytes") for t in ts if t.get("daemon", {}).get("rss_bytes")]
        if cpu:
            s["daemon_cpu_s_median"] = statistics.median(cpu)
        if rss:
            s["daemon_rss_bytes_median"] = statistics.median(rss)
        idle = [
            t["daemon"]["idle_rss_bytes"] for t in ts if t.get("daemon", {}).get("idle_rss_bytes")
        ]
        if idle:
            s["daemon_idle_rss_bytes_median"] = statistics.median(idle)
        sc = [
            t["daemon"]["startup_cpu_s"]
            for t in ts
            if t.get("daemon", {}).get("startup_cpu_s") is not None
        ]
        if sc:
            s["daemon_startup_cpu_s_median"] = statistics.median(sc)
        summ[key] = s
    return summ


def _bits_per_s(rate: str) -> float:
    m = re.fullmatch(r"([0-9.]+)([kmg]?)bit", rate.lower())
    if not m:
        raise ValueError(f"rate {rate!r}")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


#: Round trips a lazy pull cannot avoid: TCP connect, manifest, config, the layers'
#: footers + TOCs (all layers at once), the prefetch ranges (all layers at once).
LIMIT_RTTS = 5


def limits(doc: dict) -> dict:
    """Per network/image: the physical limit of a lazy start-up (see the module doc)."""
    out: dict = {}
    s = doc.get("summary", {})
    for net in doc["networks"]:
        rtt = 2 * net["one_way_delay_ms"] / 1e3
        bps = _bits_per_s(net["rate"])
        for img, info in doc["images"].items():
            need = info.get("need", {}).get("ours-all-opt")
            leg = s.get(f"{net['name']}/{img}/legacy")
            if not need or not leg:
                continue
            nbytes = (
                need["manifest_bytes"]
                + need["config_bytes"]
                + need["toc_footer_bytes"]
                + need["prefetch_bytes"]
            )
            local = leg["create_s"]["median"] + leg["run_s"]["median"]
            lim = {
                "bytes": nbytes,
                "transfer_s": nbytes * 8 / bps,
                "rtts": LIMIT_RTTS,
                "rtt_s": LIMIT_RTTS * rtt,
                "local_start_s": local,
                "local_run_s": leg["run_s"]["median"],
            }
            lim["limit_s"] = lim["transfer_s"] + lim["rtt_s"] + local
            ours = s.get(f"{net['name']}/{img}/ours-all-opt")
            if ours:
                fb = ours["fetched_bytes"]["median"]
                lim["ours_all_opt_fetched_bytes"] = fb
                lim["limit_fetched_s"] = fb * 8 / bps + lim["rtt_s"] + local
                lim["ours-all-opt/limit"] = ours["total_s"]["median"] / lim["limit_s"]
            out[f"{net['name']}/{img}"] = lim
    return out


RATIOS = (
    ("ours-opt", "go-opt"),
    ("ours-all-opt", "go-opt"),
    ("ours-on-go-opt", "go-opt"),
)


def headline(summ: dict, lims: dict | None = None) -> dict:
    """Median total seconds per network/image/mode, the limit, and the ratios."""
    out: dict = {}
    for key, v in summ.items():
        net, img, mode = key.split("/")
        out.setdefault(f"{net}/{img}", {})[mode] = round(v["total_s"]["median"], 3)
    for key, cell in out.items():
        for a, b in RATIOS:
            if a in cell and cell.get(b):
                cell[f"{a}/{b}"] = round(cell[a] / cell[b], 3)
        lim = (lims or {}).get(key)
        if lim:
            cell["limit"] = round(lim["limit_s"], 3)
            if "ours-all-opt" in cell:
                cell["ours-all-opt/limit"] = round(cell["ours-all-opt"] / lim["limit_s"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default="python,gcc,nginx,node,python-12l")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument(
        "--net",
        default="5:200mbit,0.5:1000mbit",
        help="comma list of ONE_WAY_DELAY_MS:RATE (RTT = 2 x delay)",
    )
    ap.add_argument("--go-bin", default=GO_BIN)
    ap.add_argument("--seed", type=int, default=0)
    common.add_output_args(ap, "hellobench")
    args = ap.parse_args(argv)
    images = args.images.split(",")
    modes = args.modes.split(",")
    nets = [n.split(":") for n in args.net.split(",") if n]
    now = _dt.datetime.now(_dt.UTC)
    rng = random.Random(args.seed or int(now.timestamp()))

    doc: dict = {
        "benchmark": "hellobench",
        "date": now.isoformat(timespec="seconds"),
        "machine": common.machine(containerd=common.tool_version(["containerd", "--version"])),
        "method": __doc__.strip().splitlines()[0],
        "modes": modes,
        "workloads": {k: {"cmd": v[0], "ready": v[1]} for k, v in WORKLOADS.items() if k in images},
        "notes": [
            "ours-opt uses the prioritized-file list read from Go's optimized image "
            "(entries before .prefetch.landmark); ours-all-opt is optimized by stargz "
            "optimize with the same workload and pulled by stargz rpull",
            "limits: bytes ours-all-opt must fetch (manifest, config, footers + TOCs, "
            "prefetch ranges) at the nominal rate + 5 RTTs + legacy's median create + run "
            "(a local overlayfs start); limit_fetched_s uses the bytes actually fetched",
            "load1: the 1-minute load average at the start of each trial",
            "stargz rpull runs as a process of its own from bytecode (compileall first); "
            "rpull_inner_s is the time it reports itself (after imports, before exit)",
            "Go eStargz images use gzip level 9 (ctr-remote default); ours use our default level",
            "both daemons run with their default prefetch and background-fetch settings",
            "fetched_bytes: blob GET bytes logged by the registry from pull start to the "
            "ready line",
        ],
        "networks": [],
        "trials": [],
    }

    # Our CLI starts as an installed package does, from bytecode: with
    # PYTHONDONTWRITEBYTECODE set, a source tree would compile every module on every start.
    import stargz

    run([sys.executable, "-m", "compileall", "-q", os.path.dirname(stargz.__file__)])
    with Registry.start(make_tempdir("sgz-hbreg-"), access_log=True) as reg:
        doc["images"] = prepare_images(images, reg)
        refs = {}
        for img in images:
            for mode in modes:
                refs[(img, mode)] = reg.push_oci(
                    CACHE / "oci" / img, TAG_OF[mode], f"hb-{img}:{TAG_OF[mode]}"
                )
        big = layers_of(CACHE / "oci" / images[0], TAG_OF[modes[0]])[0]["digest"]
        for delay, rate in nets:
            net = f"rtt{2 * float(delay):g}ms-{rate}"
            netem("on", reg.port, float(delay), rate)
            try:
                meas = measure_net(reg, f"hb-{images[0]}", big)
                meas.update(name=net, one_way_delay_ms=float(delay), rate=rate)
                doc["networks"].append(meas)
                log(f"network {net}: {json.dumps(meas)}")
                for r in range(args.trials):
                    order = [(i, m) for i in images for m in modes]
                    rng.shuffle(order)
                    for img, mode in order:
                        try:
                            t = trial(img, mode, refs[(img, mode)], reg, args.go_bin)
                        except Exception as e:  # record and go on
                            t = {"image": img, "mode": mode, "error": repr(e)[-2000:]}
                        t.update(net=net, round=r)
                        doc["trials"].append(t)
                        log(json.dumps({k: v for k, v in t.items() if k != "daemon"})[:300])
                        doc["summary"] = summarize(doc["trials"])
                        doc["limits"] = limits(doc)
                        common.checkpoint(args, doc)
            finally:
                netem("off", reg.port)
    doc["summary"] = summarize(doc["trials"])
    doc["limits"] = limits(doc)
    log(f"wrote {common.save(args, doc, headline(doc['summary'], doc['limits']))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
