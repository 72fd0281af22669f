"""HelloBench side by side: legacy pull vs our stargz snapshotter vs Go's, one registry.

For each image (python, gcc, nginx) and mode:

* ``legacy``     containerd's overlayfs snapshotter, ``ctr i pull`` (full pull + unpack)
* ``ours-noopt`` our daemon, eStargz from ``stargz convert``
* ``ours-opt``   our daemon, ``stargz convert --prioritized-files`` with the access list
                 taken from Go's optimized image (files before ``.prefetch.landmark``):
                 we have no optimizer of our own yet, so ours reuses Go's profile
* ``go-noopt``   Go daemon (../shared/tools/go-peer), ``ctr-remote i convert --oci --estargz``
* ``go-opt``     Go daemon, ``ctr-remote i optimize --oci`` with the workload

and extra modes (not run unless named in ``--modes``) that separate the converter from
the snapshotter: ``ours-opt9`` is ``ours-opt`` compressed at Go's gzip level 9 instead of
our default (ISA-L level 1: ~10% larger layers, so more bytes to prefetch), and
``ours-on-go-opt`` is our daemon on Go's ``go-opt`` image; ``ours-opt-pt`` is ``ours-opt``
with ``[fuse] passthrough = true`` (off by default, as in Go); ``ours-opt-nohs`` is
``ours-opt`` with the head start off (``head_start_max_bytes = 0``: the prefetch download waits
for the TOC parse, see stargz.fs.headstart).

times ``pull`` (``ctr i pull`` / ``ctr-remote i rpull``), ``create`` (``ctr c create``: the
container's snapshot is prepared) and ``run`` (``ctr t start`` until the workload prints its
ready line; it includes waiting for prefetch, as the lazy daemons block reads of prefetched
files until prefetch lands). Every trial gets a fresh snapshotter daemon, containerd and cache;
the registry (one, behind the emulated network, shared by all modes) is the only thing kept.
Bytes fetched are counted on the registry side (its access log) up to the ready line.

Order: each round runs every (image, mode) once, shuffled. JSON goes to
``benchmarks/results/hellobench-<date>-<time>.json`` after every trial.

    sudo .venv/bin/python benchmarks/bench_hellobench.py [--images python,gcc,nginx]
        [--trials 5] [--net 5:200mbit,0.5:1000mbit] [--modes ...]
        [--go-bin /tmp/peer/bin/containerd-stargz-grpc] [--out FILE.json]

``--net`` takes ONE_WAY_DELAY_MS:RATE pairs (RTT = 2 x delay).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import hashlib
import io
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from harness.procs import (  # noqa: E402
    Containerd,
    Daemon,
    Registry,
    StargzDaemon,
    make_tempdir,
    run,
    shared_dir,
)

from stargz.image.layout import MT_OCI_CONFIG, MT_OCI_MANIFEST, Layout  # noqa: E402

CACHE = Path(os.environ.get("STARGZ_BENCH_CACHE", "/var/cache/stargz-bench"))
RESULTS = REPO / "benchmarks" / "results"
MODES = ["legacy", "ours-noopt", "ours-opt", "go-noopt", "go-opt"]
EXTRA_MODES = ["ours-opt9", "ours-on-go-opt", "ours-opt-pt", "ours-opt-nohs"]
TAG_OF = {
    "legacy": "orig",
    "ours-noopt": "ours-noopt",
    "ours-opt": "ours-opt",
    "go-noopt": "go-noopt",
    "go-opt": "go-opt",
    "ours-opt9": "ours-opt9",
    "ours-on-go-opt": "go-opt",
    "ours-opt-pt": "ours-opt",
    "ours-opt-nohs": "ours-opt",
}
#: Daemon config per mode (ours): ``ours-opt-pt`` turns FUSE passthrough on,
#: ``ours-opt-nohs`` the head start off.
OURS_CONFIG = {
    "ours-opt-pt": "[fuse]\npassthrough = true\n",
    "ours-opt-nohs": "head_start_max_bytes = 0\n",
}
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: image -> (command, ready line)
WORKLOADS: dict[str, tuple[list[str], str]] = {
    "python": (["python3", "-c", "print('hello')"], "hello"),
    "gcc": (["sh", "-c", "gcc -o /tmp/hello /hello.c && /tmp/hello"], "hello"),
    # nginx opens its listening sockets before it daemonizes: the parent's exit means ready.
    "nginx": (["sh", "-c", "nginx && echo ready && exec sleep 3600"], "ready"),
}
LANDMARK = ".prefetch.landmark"


def log(*a: object) -> None:
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- images


def _tar_gz_rootfs(root: Path) -> tuple[bytes, bytes]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel = os.path.relpath(dirpath, root)
            if rel != ".":
                tf.add(dirpath, arcname=rel, recursive=False)
            for name in sorted(
                filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            ):
                p = os.path.join(dirpath, name)
                arc = name if rel == "." else os.path.join(rel, name)
                tf.add(p, arcname=arc, recursive=False)
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return raw.getvalue(), gzip.compress(raw.getvalue(), 6, mtime=0)


def pack_rootfs(layout_dir: Path, tag: str, root: Path, cmd: list[str]) -> dict:
    """One-layer gzip OCI image of ``root`` (the 'original' form)."""
    layout = Layout(str(layout_dir), create=True)
    raw, blob = _tar_gz_rootfs(root)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    tmp = layout.new_blob()
    tmp.write(blob)
    layout.commit_blob(tmp, digest)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]},
        "config": {"Cmd": cmd, "Env": [PATH_ENV], "WorkingDir": "/"},
    }
    cdigest, csize = layout.put_json(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": {"mediaType": MT_OCI_CONFIG, "digest": cdigest, "size": csize},
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": digest,
                "size": len(blob),
            }
        ],
    }
    mdigest, msize = layout.put_json(manifest)
    layout.tag({"mediaType": MT_OCI_MANIFEST, "digest": mdigest, "size": msize}, tag)
    return {"uncompressed": len(raw), "compressed": len(blob)}


def layers_of(layout_dir: Path, tag: str) -> list[dict]:
    lay = Layout(str(layout_dir))
    return lay.read_json(lay.resolve(tag)["digest"])["layers"]


def has_tag(layout_dir: Path, tag: str) -> bool:
    try:
        Layout(str(layout_dir)).resolve(tag)
        return True
    except Exception:
        return False


def prioritized_from_go(layout_dir: Path) -> list[str]:
    """Paths Go's optimizer put before the prefetch landmark, in order (all layers)."""
    from stargz.estargz.reader import open_file

    lay = Layout(str(layout_dir))
    out: list[str] = []
    for layer in layers_of(layout_dir, "go-opt"):
        r = open_file(lay.blob_path(layer["digest"]), verify=False)
        try:
            names = [e.name for e in r.toc.entries]
        finally:
            close = getattr(r, "close", None)
            if close:
                close()
        if LANDMARK not in names:
            continue
        for n in names[: names.index(LANDMARK)]:
            n = n.strip("/").removeprefix("./")
            if n and n not in out and not n.startswith(".prefetch") and n != "stargz.index.json":
                out.append(n)
    return out


def prepare_images(images: list[str], reg: Registry) -> dict:
    """Build/cached OCI layouts with all five forms; return per-image sizes."""
    if not all((CACHE / f"{img}.done").exists() for img in images):
        run(["bash", str(REPO / "benchmarks" / "hellobench" / "rootfs.sh")], timeout=3600)
    info: dict[str, dict] = {}
    py = str(REPO / ".venv" / "bin" / "python")
    for img in images:
        d = CACHE / "oci" / img
        cmd, _ = WORKLOADS[img]
        if not has_tag(d, "orig"):
            log(f"pack {img}")
            shutil.rmtree(d, ignore_errors=True)
            d.parent.mkdir(parents=True, exist_ok=True)
            pack_rootfs(d, "orig", CACHE / img, cmd)
        if not has_tag(d, "ours-noopt"):
            log(f"convert {img} (ours, noopt)")
            run(
                [
                    py,
                    "-m",
                    "stargz.cli.main",
                    "convert",
                    "-q",
                    f"oci:{d}:orig",
                    f"oci:{d}:ours-noopt",
                ],
                timeout=3600,
            )
        if not (has_tag(d, "go-noopt") and has_tag(d, "go-opt")):
            go_convert(img, d, reg)
        for tag, level in (("ours-opt", []), ("ours-opt9", ["--compression-level", "9"])):
            if has_tag(d, tag):
                continue
            prio = prioritized_from_go(d)
            (d / "prioritized.txt").write_text("".join(p + "\n" for p in prio))
            log(f"convert {img} (ours, {tag}: {len(prio)} prioritized files from Go's profile)")
            run(
                [
                    py,
                    "-m",
                    "stargz.cli.main",
                    "convert",
                    "-q",
                    *level,
                    "--prioritized-files",
                    str(d / "prioritized.txt"),
                    f"oci:{d}:orig",
                    f"oci:{d}:{tag}",
                ],
                timeout=3600,
            )
        sizes = {}
        for mode, tag in TAG_OF.items():
            ls = layers_of(d, tag)
            sizes[mode] = sum(x["size"] for x in ls)
        prio_file = d / "prioritized.txt"
        info[img] = {
            "compressed_bytes": sizes,
            "prioritized_files": len(prio_file.read_text().splitlines())
            if prio_file.exists()
            else None,
        }
    return info


def go_convert(img: str, d: Path, reg: Registry) -> None:
    """go-noopt / go-opt with ctr-remote on a scratch containerd; copied back into the layout."""
    cmd, _ = WORKLOADS[img]
    name = f"prep-{img}"
    src = reg.push_oci(d, "orig", f"{name}:orig")
    dummy = make_tempdir("sgz-dummy-")
    with Containerd.start(str(dummy / "none.sock")) as cd:
        a = ["ctr-remote", "-a", cd.address, "-n", "prep"]
        run([*a, "i", "pull", "--plain-http", src], timeout=1200)
        log(f"convert {img} (Go, noopt)")
        run(
            [*a, "i", "convert", "--oci", "--estargz", src, reg.ref(f"{name}:go-noopt")],
            timeout=3600,
        )
        log(f"optimize {img} (Go)")
        run(
            [
                *a,
                "i",
                "optimize",
                "--oci",
                "--period",
                "10",
                "--entrypoint",
                json.dumps(cmd[:1]),
                "--args",
                json.dumps(cmd[1:]),
                src,
                reg.ref(f"{name}:go-opt"),
            ],
            timeout=3600,
        )
        for t in ("go-noopt", "go-opt"):
            run([*a, "i", "push", "--plain-http", reg.ref(f"{name}:{t}")], timeout=1200)
            run(
                [
                    "skopeo",
                    "--insecure-policy",
                    "copy",
                    "--quiet",
                    "--src-tls-verify=false",
                    f"docker://{reg.ref(f'{name}:{t}')}",
                    f"oci:{d}:{t}",
                ],
                timeout=1200,
            )
    shutil.rmtree(dummy, ignore_errors=True)


# ---------------------------------------------------------------- Go daemon


class GoDaemon(Daemon):
    """The Go ``containerd-stargz-grpc`` built by ../shared/tools/go-peer/build.sh."""

    name = "go-stargz"

    @classmethod
    def start(cls, binary: str, registry_host: str, extra_toml: str = "") -> GoDaemon:
        self = cls(make_tempdir("sgz-go-"))
        (self.workdir / "run").mkdir()
        self.address = str(self.workdir / "run" / "stargz.sock")
        self.root = str(self.workdir / "root")
        cfg = self.workdir / "config.toml"
        cfg.write_text(
            extra_toml + f'root_path = "{self.root}"\naddress = "{self.address}"\n'
            f'[[resolver.host."{registry_host}".mirrors]]\n'
            f'host = "{registry_host}"\ninsecure = true\n'
        )
        self._launch([binary, "-config", str(cfg), "-log-level", "info"])
        return self

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.address)
        return True


# ---------------------------------------------------------------- one trial


def proc_usage(pid: int) -> dict:
    """CPU seconds (user+sys, incl. waited-for children) and RSS of a process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tck = os.sysconf("SC_CLK_TCK")
        cpu = sum(int(x) for x in fields[11:15]) / tck
        rss = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        return {"cpu_s": cpu, "rss_bytes": rss}
    except OSError:
        return {}


def registry_bytes(reg: Registry) -> int:
    return sum(r.size for r in reg.blob_requests() if r.method == "GET")


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
    res: dict = {"image": img, "mode": mode}
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
        for line in p.stdout:
            out.append(line)
            if line.strip() == ready:
                ok = True
                break
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


# ---------------------------------------------------------------- network


def netem(action: str, port: int, delay_ms: float = 0, rate: str = "") -> None:
    """../shared/tools/netem on the registry port. netem.sh takes whole milliseconds; for a
    fractional one-way delay it is started with 1 ms and its delay program (the one it just
    started, by the pid it recorded) is replaced by the same binary with the delay in us."""
    peer = Path(os.environ.get("PEER_DIR", "/tmp/peer"))
    env = dict(
        os.environ,
        PEER_PORT=str(port),
        DELAY_MS=str(max(1, round(delay_ms))) if delay_ms else "0",
        RATE=rate or "1000mbit",
        PEER_DIR=str(peer),
    )
    run(["bash", str(shared_dir() / "tools" / "netem" / "netem.sh"), action], env=env, timeout=300)
    if action == "on" and delay_ms and delay_ms != round(delay_ms):
        pidf = peer / "netem-delay.pid"
        old = int(pidf.read_text())
        os.kill(old, 15)
        for _ in range(50):
            if not Path(f"/proc/{old}").exists():
                break
            time.sleep(0.1)
        with open(peer / "netem-delay.log", "ab") as lg:
            p = subprocess.Popen(
                [
                    "chrt",
                    "-f",
                    "20",
                    str(peer / "bin" / "nfq-delay"),
                    os.environ.get("QNUM", "5001"),
                    str(int(delay_ms * 1000)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=lg,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        pidf.write_text(f"{p.pid}\n")
        time.sleep(0.3)
        if p.poll() is not None:
            raise RuntimeError("nfq-delay did not start; see netem-delay.log")


def measure_net(reg: Registry, ref_name: str, big_digest: str) -> dict:
    """Timed 4 KiB range requests (RTT) and a full blob GET (throughput) through the shaping."""
    url = f"http://{reg.host}/v2/{ref_name}/blobs/{big_digest}"
    rtts = []
    for _ in range(5):
        o = run(
            [
                "curl",
                "-fsS",
                "-o",
                "/dev/null",
                "-r",
                "0-4095",
                "-w",
                "%{time_connect} %{time_starttransfer}",
                url,
            ]
        ).stdout.split()
        connect, ttfb = float(o[0]), float(o[1])
        rtts.append({"connect_s": connect, "ttfb_s": ttfb})
    o = run(
        ["curl", "-fsS", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url],
        timeout=600,
    ).stdout.split()
    size, tot = float(o[0]), float(o[1])
    return {
        "connect_s_median": statistics.median(r["connect_s"] for r in rtts),
        "range4k_ttfb_s_median": statistics.median(r["ttfb_s"] for r in rtts),
        "full_blob_bytes": int(size),
        "full_blob_s": tot,
        "throughput_mbit_s": size * 8 / tot / 1e6,
    }


# ---------------------------------------------------------------- stats/report


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


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
                "p95": pct(xs, 0.95),
                "min": min(xs),
                "max": max(xs),
            }
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


def machine() -> dict:
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_bytes": mem,
        "python": platform.python_version(),
        "containerd": run(["containerd", "--version"], check=False).stdout.strip(),
        "note": "shared 2-core VM; other jobs ran concurrently, numbers are noisy",
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default="python,gcc,nginx")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument(
        "--net",
        default="5:200mbit,0.5:1000mbit",
        help="comma list of ONE_WAY_DELAY_MS:RATE (RTT = 2 x delay)",
    )
    ap.add_argument("--go-bin", default="/tmp/peer/bin/containerd-stargz-grpc")
    ap.add_argument("--out", default="")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    images = args.images.split(",")
    modes = args.modes.split(",")
    nets = [n.split(":") for n in args.net.split(",") if n]
    now = _dt.datetime.now(_dt.UTC)
    out_path = Path(args.out or RESULTS / f"hellobench-{now:%Y%m%d-%H%M}.json")
    rng = random.Random(args.seed or int(now.timestamp()))

    doc: dict = {
        "benchmark": "hellobench",
        "date": now.isoformat(timespec="seconds"),
        "machine": machine(),
        "method": __doc__.strip().splitlines()[0],
        "modes": modes,
        "workloads": {k: {"cmd": v[0], "ready": v[1]} for k, v in WORKLOADS.items() if k in images},
        "notes": [
            "ours-opt uses the prioritized-file list read from Go's optimized image "
            "(entries before .prefetch.landmark): we have no optimizer yet",
            "Go eStargz images use gzip level 9 (ctr-remote default); ours use our default level",
            "both daemons run with their default prefetch and background-fetch settings",
            "fetched_bytes: blob GET bytes logged by the registry from pull start to the "
            "ready line",
        ],
        "networks": [],
        "trials": [],
    }

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
                        out_path.write_text(json.dumps(doc, indent=1) + "\n")
            finally:
                netem("off", reg.port)
    doc["summary"] = summarize(doc["trials"])
    out_path.write_text(json.dumps(doc, indent=1) + "\n")
    log(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
