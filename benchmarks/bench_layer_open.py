"""Layer open over the network: resolve (blob probe) + fetch of the footer and TOC bytes.

What our daemon does before it can parse a layer's TOC (``StargzFileSystem._acquire``):
``RegistryLayerSource.resolve`` -> ``RegistryClient.open_blob`` (a ``GET`` probe that
learns the size and any redirect), then ``stargz.fs.layer_open.fetch_tail`` (the last bytes of
the blob: footer + TOC, one or two more GETs unless the probe already brought them).

A real docker-registry (tests/harness) behind ``../shared/tools/netem`` (delay + rate on
the registry port, MSS clamped to 1460, so TCP slow start counts) serves eStargz layers
with TOCs of every size: ``/var/cache/stargz-bench/oci/python:ours-opt`` (76 MB, 8k
entries, 443 KB from TOC to end; skipped if the HelloBench cache is absent), and from
``../shared/fixtures`` the big ``oci-corners:esgz`` layer (5.4 MB, 16 KB tail), the
``oci-busybox:esgz`` layer (1 MB, 564 B tail) and the small corners layer (a 1217-byte
blob). Each trial uses a fresh ``RegistryClient`` (a fresh connection pool, like a fresh
daemon) and times:

- ``resolve_s``: ``RegistryLayerSource.resolve`` (the probe);
- ``tail_s``: ``fetch_tail`` (no disk cache);
- ``total_s``: both.

It counts HTTP requests (the client's own counter and the registry's access log) and TCP
connections opened (aiohttp trace hooks), and checks the returned bytes against the blob
on disk. Modes are ``NAME=PROBE_BYTES``: the ``tail_probe_size`` the client probes with
(0 = the old ``Range: bytes=0-0`` probe, the tail fetched afterwards; ``default`` =
``client.TAIL_PROBE_SIZE``). Every round runs each (layer, mode) once, in shuffled order.

    python -m benchmarks.bench_layer_open [--trials 15]
        [--net 5:200mbit,0.5:1000mbit] [--modes old=0,new=default,fused64k=65536]
        [--images python/ours-opt,oci-corners/esgz,...]

``--net`` takes ONE_WAY_DELAY_MS:RATE pairs (RTT = 2 x delay). Writes
``results/layer-open.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import os
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp  # noqa: E402
import uvloop  # noqa: E402

from benchmarks import common
from benchmarks.common import CACHE, percentile
from benchmarks.peer import netem
from stargz.estargz.footer import parse_footer  # noqa: E402
from stargz.fs.layer_open import fetch_tail  # noqa: E402
from stargz.fs.registry import RegistryLayerSource  # noqa: E402
from stargz.remote import RegistryClient  # noqa: E402
from stargz.remote import client as client_mod  # noqa: E402
from stargz.remote import transport as transport_mod  # noqa: E402
from tests.harness.procs import Registry, make_tempdir, run, shared_dir

# ---------------------------------------------------------------- image


def layout_of(name: str) -> Path:
    """``python``/``gcc``/``nginx``: the HelloBench cache; ``oci-*``: the shared fixtures."""
    if name.startswith("oci-"):
        return shared_dir() / "fixtures" / name
    return CACHE / "oci" / name


def pick_layer(layout: Path, tag: str, smallest: bool = False) -> dict | None:
    """The biggest (or smallest) layer of ``layout:tag`` (None if there is no such image)."""
    index = layout / "index.json"
    if not index.is_file():
        return None
    for d in json.loads(index.read_text())["manifests"]:
        if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            m = json.loads(blob_path(layout, d["digest"]).read_bytes())
            return (min if smallest else max)(m["layers"], key=lambda x: x["size"])
    return None


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


# ---------------------------------------------------------------- network


def measure_rtt(host: str) -> float:
    """Median seconds to connect (one RTT through the shaping)."""
    import socket

    h, p = host.rsplit(":", 1)
    xs = []
    for _ in range(5):
        t = time.perf_counter()
        with socket.create_connection((h, int(p)), timeout=5):
            xs.append(time.perf_counter() - t)
    return statistics.median(xs)


_SS_KEYS = ("cwnd", "bytes_sent", "busy", "rwnd_limited", "retrans", "delivery_rate")


def server_tcp(port: int) -> list[dict[str, str]]:
    """From ``ss -tni``, per established registry socket: its cwnd, bytes sent, busy and
    receive-window-limited time, retransmits, delivery rate."""
    p = run(["ss", "-tniH", "state", "established", f"( sport = :{port} )"], check=False)
    sockets: list[str] = []
    for line in p.stdout.splitlines():  # an address line, then indented info line(s)
        if line.strip() and not line[:1].isspace():
            sockets.append(line)
        elif sockets:
            sockets[-1] += " " + line
    out = []
    for sock in sockets:
        words = sock.split()
        info = {}
        for i, w in enumerate(words):
            k, sep, v = w.partition(":")
            if k in _SS_KEYS and sep:
                info[k] = v
            elif w == "delivery_rate" and i + 1 < len(words):
                info[w] = words[i + 1]
        out.append(info)
    return out


# ---------------------------------------------------------------- trial


def new_client(probe: int | None) -> tuple[RegistryClient, dict]:
    """A fresh client whose session counts connections (same settings as client.py's)."""
    counts = {"connections": 0, "reused": 0}
    tc = aiohttp.TraceConfig()

    async def created(session, ctx, params):
        counts["connections"] += 1

    async def reused(session, ctx, params):
        counts["reused"] += 1

    tc.on_connection_create_end.append(created)
    tc.on_connection_reuseconn.append(reused)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64),
        headers={"User-Agent": transport_mod.USER_AGENT, "Accept-Encoding": "identity"},
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None),
        trace_configs=[tc],
    )
    kw = {}
    if probe is not None:
        if "tail_probe_size" not in inspect.signature(RegistryClient).parameters:
            if probe:
                raise SystemExit("this RegistryClient has no tail_probe_size")
        else:
            kw["tail_probe_size"] = probe
    return RegistryClient(keychain=None, session=session, **kw), counts


async def one_trial(
    ref: str, digest: str, probe: int | None, local: bytes, ex: ThreadPoolExecutor, port: int
) -> dict:
    c, counts = new_client(probe)
    try:
        src = RegistryLayerSource(c)
        t0 = time.perf_counter()
        blob = await src.resolve(ref, digest, {})
        t1 = time.perf_counter()
        start, data, fetched = await fetch_tail(blob, digest, None, ex)
        t2 = time.perf_counter()
        tcp = server_tcp(port)
        footer = parse_footer(data[-64:], len(local))
        ok = start == footer.toc_offset and data == local[start:]
        if not ok:
            raise SystemExit(f"wrong tail bytes: start {start}, {len(data)} bytes")
        return {
            "resolve_s": round(t1 - t0, 6),
            "tail_s": round(t2 - t1, 6),
            "total_s": round(t2 - t0, 6),
            "requests": c.stats.requests,
            "connections": counts["connections"],
            "reused": counts["reused"],
            "bytes": c.stats.bytes_fetched,
            "tail_bytes": len(data),
            "server_tcp": tcp,
        }
    finally:
        await c.session.close()
        await c.close()


def summarize(trials: list[dict], keys=("resolve_s", "tail_s", "total_s")) -> dict:
    out: dict = {"n": len(trials)}
    for k in keys:
        xs = [t[k] for t in trials]
        out[k] = {
            "median_ms": round(statistics.median(xs) * 1000, 2),
            "p95_ms": round(percentile(xs, 95) * 1000, 2),
            "min_ms": round(min(xs) * 1000, 2),
        }
    for k in ("requests", "registry_gets", "connections", "bytes"):
        vals = sorted({t[k] for t in trials if k in t})
        out[k] = vals[0] if len(vals) == 1 else vals
    return out


def parse_modes(spec: str) -> list[tuple[str, int | None]]:
    out = []
    for item in spec.split(","):
        name, _, val = item.partition("=")
        out.append((name, None if val in ("", "default") else int(val)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=15)
    ap.add_argument("--net", default="5:200mbit,0.5:1000mbit")
    ap.add_argument("--modes", default="old=0,new=default,fused64k=65536")
    ap.add_argument(
        "--images",
        default="python/ours-opt,oci-corners/esgz,oci-busybox/esgz,oci-corners/esgz:small",
        help="LAYOUT/TAG[:small] list; the biggest (smallest) layer of each is opened "
        "(python: the HelloBench cache, skipped if absent; oci-*: ../shared/fixtures)",
    )
    ap.add_argument("--seed", type=int, default=0)
    common.add_output_args(ap, "layer-open")
    args = ap.parse_args(argv)
    modes = parse_modes(args.modes)
    nets = [n.split(":") for n in args.net.split(",") if n]
    now = _dt.datetime.now(_dt.UTC)
    rng = random.Random(args.seed or int(now.timestamp()))
    layers = {}
    for spec in args.images.split(","):
        name, _, tag = spec.partition("/")
        tag, _, which = tag.partition(":")
        layout = layout_of(name)
        layer = pick_layer(layout, tag, smallest=which == "small")
        if layer is None:
            print(f"skipping {spec}: not found under {layout}")
            continue
        local = blob_path(layout, layer["digest"]).read_bytes()
        footer = parse_footer(local[-64:], len(local))
        layers[spec] = (layout, tag, layer["digest"], local, footer.toc_offset)
    if not layers:
        raise SystemExit("no eStargz image found")

    doc: dict = {
        "benchmark": "layer-open",
        "date": now.isoformat(timespec="seconds"),
        "machine": common.machine(
            aiohttp=aiohttp.__version__,
            uvloop=uvloop.__version__,
            registry=common.tool_version(["docker-registry", "--version"]),
            tcp_congestion=Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip(),
        ),
        "method": __doc__.strip().splitlines()[0],
        "images": {
            spec: {
                "layout": str(layout),
                "tag": tag,
                "layer": digest,
                "size": len(local),
                "toc_offset": toc_offset,
                "tail_bytes": len(local) - toc_offset,
            }
            for spec, (layout, tag, digest, local, toc_offset) in layers.items()
        },
        "modes": {
            name: getattr(client_mod, "TAIL_PROBE_SIZE", None) if probe is None else probe
            for name, probe in modes
        },
        "default_tail_probe_size": getattr(client_mod, "TAIL_PROBE_SIZE", None),
        "trials_per_mode": args.trials,
        "networks": [],
    }
    loop = uvloop.new_event_loop()
    ex = ThreadPoolExecutor(2)
    with Registry.start(make_tempdir("sgz-loreg-"), access_log=True) as reg:
        pushed: dict[tuple[Path, str], str] = {}
        refs = {}
        for spec, (layout, tag, *_) in layers.items():
            if (layout, tag) not in pushed:
                pushed[layout, tag] = reg.push_oci(layout, tag, f"lo-{layout.name}:{tag}")
            refs[spec] = pushed[layout, tag]
        for delay, rate in nets:
            net = {"one_way_delay_ms": float(delay), "rate": rate, "trials": []}
            netem("on", reg.port, float(delay), rate)
            try:
                net["measured_connect_rtt_ms"] = round(measure_rtt(reg.host) * 1000, 2)
                # warm the registry (page cache, its blob stat cache) once per network
                for spec, (_, _, digest, local, _) in layers.items():
                    loop.run_until_complete(one_trial(refs[spec], digest, 0, local, ex, reg.port))
                for i in range(args.trials):
                    order = [(spec, m) for spec in layers for m in modes]
                    rng.shuffle(order)
                    for spec, (name, probe) in order:
                        _, _, digest, local, _ = layers[spec]
                        gets0 = len(reg.blob_requests(digest))
                        res = loop.run_until_complete(
                            one_trial(refs[spec], digest, probe, local, ex, reg.port)
                        )
                        time.sleep(0.05)  # the access log line is written after the response
                        res["registry_gets"] = len(reg.blob_requests(digest)) - gets0
                        res.update(
                            image=spec, mode=name, round=i, load1=round(os.getloadavg()[0], 2)
                        )
                        net["trials"].append(res)
                        print(
                            f"{delay}ms {rate} {spec:18s} {name:8s} #{i:2d} resolve "
                            f"{res['resolve_s'] * 1000:6.1f} tail {res['tail_s'] * 1000:6.1f} "
                            f"total {res['total_s'] * 1000:6.1f} ms  req {res['requests']} "
                            f"conn {res['connections']}",
                            flush=True,
                        )
            finally:
                netem("off", reg.port)
            net["summary"] = {
                f"{spec} {name}": summarize(
                    [t for t in net["trials"] if t["mode"] == name and t["image"] == spec]
                )
                for spec in layers
                for name, _ in modes
            }
            doc["networks"].append(net)
            common.checkpoint(args, doc)
    loop.close()
    ex.shutdown()
    headline = {
        f"{net['one_way_delay_ms']}ms/{name}": s["total_s"]["median_ms"]
        for net in doc["networks"]
        for name, s in net["summary"].items()
    }
    print(f"wrote {common.save(args, doc, headline)}")
    for net in doc["networks"]:
        print(f"--- {net['one_way_delay_ms']} ms one way, {net['rate']}")
        for name, s in net["summary"].items():
            print(
                f"{name:27s} resolve {s['resolve_s']['median_ms']:6.1f} "
                f"(p95 {s['resolve_s']['p95_ms']:6.1f})  tail {s['tail_s']['median_ms']:6.1f} "
                f"(p95 {s['tail_s']['p95_ms']:6.1f})  total {s['total_s']['median_ms']:6.1f} "
                f"(p95 {s['total_s']['p95_ms']:6.1f}) ms  requests {s['requests']} "
                f"registry GETs {s['registry_gets']} connections {s['connections']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
