"""TOC parse: ``json.loads`` + build (the CLI's open) against ``build_json`` (the daemon's).

Opening a lazily pulled layer parses its TOC JSON on the container's start-up path. The
reader used to do ``load_toc_doc`` (``json.loads``) and then the native ``tocbuild.build``
over the parsed dicts; with ``keep_toc=False`` (the daemon) it now calls
``tocbuild.build_json``, which scans the bytes itself (without the GIL) and builds the
same `OpenedTOC`. Both contenders run on real TOCs: the HelloBench ``python`` image's
largest layer (``/var/cache/stargz-bench/oci/python:ours-opt``, 8242 entries, 2.6 MB of
JSON) and the 100k-file layer (``/var/cache/stargz-bench/many-files/oci:ours``, 33 MB),
each skipped when its cache is absent. Measured, CPU time (``time.process_time``) with the
cyclic GC paused as the reader pauses it:

- ``warm``: the two contenders alternating in one process, median (and min, p90) of
  ``--warm`` calls each; the old path includes freeing the parsed dicts, as the reader did;
- ``cold``: the first call in a fresh process (after the imports and reading the TOC),
  median of ``--cold`` processes each, alternating; also the RSS it added, kept (with the
  result alive, as a mount keeps it) and at the peak;
- ``scan``: ``build_json``'s scanner alone (``_tocbuild.scan``), the part that runs
  without the GIL (in batches of 1024 entries, between which the GIL is taken to build);
- ``gil``: a second thread ticking every 0.5 ms (``time.sleep``, like an event loop
  waiting on I/O) during each call: the longest it had to wait for the GIL, and the ticks
  it got in. The old path's ``json.loads`` holds the GIL throughout; ``build_json`` holds
  it after the scan, but hands it over when a waiter asks (after the 5 ms switch interval).

``--baseline-src DIR`` also runs the old path with another source tree (e.g. the main
branch before this change: its builder lacks this change's speed-ups) in subprocesses,
warm and cold. Both results are checked equal to each other before anything is timed,
and ``build_json`` must not have fallen back to the old path.

    python -m benchmarks.bench_toc_parse [--warm 20] [--cold 5] [--tocs python,many-files]
        [--baseline-src ../main/src]

Writes ``results/toc-parse.json``. Never asserts speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks import common
from benchmarks.common import CACHE, REPO

#: name -> (OCI layout, tag): the tag's largest eStargz layer.
TOCS = {
    "python": (CACHE / "oci" / "python", "ours-opt"),
    "many-files": (CACHE / "many-files" / "oci", "ours"),
}
MAX_CHUNK = 1 << 28


def _stargz_src() -> Path:
    """The source tree this process imports stargz from (children use the same one)."""
    import stargz

    return Path(stargz.__file__).resolve().parents[1]


def layer_blob(layout: Path, tag: str) -> Path | None:
    """The largest layer with a TOC digest annotation of ``tag``, or None."""
    try:
        index = json.loads((layout / "index.json").read_text())
    except FileNotFoundError:
        return None
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag:
            continue
        algo, _, hexd = desc["digest"].partition(":")
        manifest = json.loads((layout / "blobs" / algo / hexd).read_text())
        layers = [
            d
            for d in manifest["layers"]
            if "containerd.io/snapshot/stargz/toc.digest" in d.get("annotations", {})
        ]
        if not layers:
            return None
        algo, _, hexd = max(layers, key=lambda d: d["size"])["digest"].partition(":")
        return layout / "blobs" / algo / hexd
    return None


def toc_of(blob: Path) -> tuple[bytes, int]:
    """(TOC JSON bytes, payload end) of a layer blob, read as the reader reads them but
    not parsed (a build before the timed one would have warmed the allocator)."""
    from stargz.estargz import reader
    from stargz.estargz.footer import parse_footer

    fd = os.open(blob, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        tail = min(size, 4096)  # (as the reader: every footer kind fits)
        f = parse_footer(os.pread(fd, tail, size - tail), size)
        end = f.toc_offset + f.toc_size if f.toc_size else size - f.footer_size
        raw = os.pread(fd, end - f.toc_offset, f.toc_offset)
    finally:
        os.close(fd)
    if f.kind == "zstd":
        return reader._inflate_zstd_toc(raw, f.toc_uncompressed_size, 1 << 30), f.toc_offset
    return reader._untar_gzip_toc(raw, 1 << 30), f.toc_offset


def contenders(data: bytes, payload_end: int):
    from stargz.estargz import tocbuild
    from stargz.estargz.toc import load_toc_doc

    kw = {"payload_end": payload_end, "verify": True, "max_chunk_size": MAX_CHUNK}

    def old():
        entries = load_toc_doc(data)[1]
        built = tocbuild.build(entries, **kw)
        del entries  # (the reader dropped them in __init__)
        return built

    def new():
        return tocbuild.build_json(data, **kw)

    return {"old": old, "new": new}


def cpu_ms(fn) -> tuple[float, float]:
    """(CPU ms, wall ms) of one call, the GC paused as the reader pauses it; the result is
    freed outside the timing."""
    gc.disable()
    try:
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        c1, w1 = time.process_time(), time.perf_counter()
    finally:
        gc.enable()
    del out
    return (c1 - c0) * 1e3, (w1 - w0) * 1e3


def stats(xs: list[float]) -> dict:
    s = sorted(xs)
    return {
        "median": round(statistics.median(s), 2),
        "min": round(s[0], 2),
        "p90": round(common.percentile(s, 90), 2),
        "n": len(s),
    }


def gil_probe(fn) -> tuple[float, int, float]:
    """(longest wait of a 0.5 ms ticker, its ticks, wall ms) while ``fn`` runs."""
    ticks: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    th = threading.Thread(target=tick)
    th.start()
    gc.disable()
    try:
        time.sleep(0.02)
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
    finally:
        gc.enable()
        stop.set()
        th.join()
    del out
    during = [t for t in ticks if t0 < t < t1]
    gaps = [b - a for a, b in zip([t0, *during], [*during, t1], strict=True)]
    return max(gaps) * 1e3, len(during), (t1 - t0) * 1e3


def rss_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process, MB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def child(args: argparse.Namespace) -> None:
    """One subprocess: ``--child MODE``: ``--repeat`` calls (the first is the cold one),
    and what the first left resident (the result kept, as a mounted layer keeps it)."""
    data, payload_end = toc_of(Path(args.blob))
    fn = contenders(data, payload_end)[args.child]
    rss0, _ = rss_mb()
    gc.disable()
    c0 = time.process_time()
    kept = fn()
    first = (time.process_time() - c0) * 1e3
    gc.enable()
    rss1, peak = rss_mb()
    times = [first] + [cpu_ms(fn)[0] for _ in range(args.repeat - 1)]
    del kept
    json.dump({"cpu_ms": times, "rss_kept_mb": rss1 - rss0, "peak_mb": peak - rss0}, sys.stdout)


def run_child(src: Path, blob: Path, mode: str, repeat: int) -> dict:
    """One fresh process importing stargz from ``src`` (first on its PYTHONPATH)."""
    argv = [sys.executable, "-m", "benchmarks.bench_toc_parse", "--child", mode]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [*argv, "--blob", str(blob), "--repeat", str(repeat)],
        capture_output=True,
        check=True,
        cwd=REPO,
        env=env,
    )
    return json.loads(out.stdout)


def bench_toc(name: str, blob: Path, args: argparse.Namespace) -> dict:
    from stargz.estargz import tocbuild
    from stargz.estargz.node import same

    data, payload_end = toc_of(blob)
    fns = contenders(data, payload_end)
    native = tocbuild.native
    fallbacks = native.json_fallbacks() if native is not None else None
    check = same(fns["old"](), fns["new"]())
    if check:
        raise SystemExit(f"{name}: build_json differs from json.loads + build: {check}")
    out: dict = {
        "blob": str(blob),
        "json_bytes": len(data),
        "nodes": len(fns["new"]().nodes),
        "backend": tocbuild.backend,
    }
    if native is not None:
        out["fast_path"] = native.json_fallbacks() == fallbacks
    print(f"{name}: {len(data) / 1e6:.2f} MB of JSON, {out['nodes']} nodes", flush=True)

    # warm, alternating
    warm: dict[str, list[float]] = {"old": [], "new": []}
    wall: dict[str, list[float]] = {"old": [], "new": []}
    for k in range(args.warm):
        for mode in ("old", "new") if k % 2 else ("new", "old"):
            c, w = cpu_ms(fns[mode])
            warm[mode].append(c)
            wall[mode].append(w)
    out["warm_cpu_ms"] = {m: stats(v) for m, v in warm.items()}
    out["warm_wall_ms"] = {m: stats(v) for m, v in wall.items()}

    # the old path's two parts, and build_json's GIL-free scan
    from stargz.estargz.toc import load_toc_doc

    loads, scan = [], []
    for _ in range(args.warm):
        loads.append(cpu_ms(lambda: load_toc_doc(data))[0])
        if native is not None:
            scan.append(cpu_ms(lambda: native.scan(data))[0])
    out["old_json_loads_cpu_ms"] = stats(loads)
    if scan:
        out["new_scan_nogil_cpu_ms"] = stats(scan)

    # GIL: a ticker thread during each call
    probes: dict[str, list[tuple[float, int, float]]] = {"old": [], "new": []}
    for k in range(args.gil):
        for mode in ("old", "new") if k % 2 else ("new", "old"):
            probes[mode].append(gil_probe(fns[mode]))
    out["gil_ticker"] = {
        m: {
            "longest_wait_ms": stats([p[0] for p in v]),
            "ticks": stats([p[1] for p in v]),
            "wall_ms": stats([p[2] for p in v]),
        }
        for m, v in probes.items()
    }

    # cold: the first call in fresh processes, alternating
    cold: dict[str, list[dict]] = {"old": [], "new": []}
    for k in range(args.cold):
        for mode in ("old", "new") if k % 2 else ("new", "old"):
            cold[mode].append(run_child(_stargz_src(), blob, mode, 1))
    out["cold_cpu_ms"] = {m: stats([r["cpu_ms"][0] for r in v]) for m, v in cold.items()}
    # RSS growth over the process's state before the call: kept with the result, and peak
    out["cold_rss_mb"] = {
        m: {k: stats([r[k] for r in v]) for k in ("rss_kept_mb", "peak_mb")}
        for m, v in cold.items()
    }

    if args.baseline_src:
        base = Path(args.baseline_src).resolve()
        first, rest = [], []
        for _ in range(args.cold):
            times = run_child(base, blob, "old", 1 + max(1, args.warm // args.cold))["cpu_ms"]
            first.append(times[0])
            rest.extend(times[1:])
        out["baseline_old"] = {
            "src": str(base),
            "cold_cpu_ms": stats(first),
            "warm_cpu_ms": stats(rest),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--warm", type=int, default=20)
    p.add_argument("--cold", type=int, default=5)
    p.add_argument("--gil", type=int, default=6)
    p.add_argument("--tocs", default=",".join(TOCS))
    p.add_argument("--baseline-src", default=None)
    common.add_output_args(p, "toc-parse")
    p.add_argument("--child", choices=["old", "new"], help=argparse.SUPPRESS)
    p.add_argument("--blob", help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return

    results, skipped = {}, {}
    for name in args.tocs.split(","):
        layout, tag = TOCS[name]
        blob = layer_blob(layout, tag)
        if blob is None:
            skipped[name] = f"no eStargz layer for {layout}:{tag}"
            print(f"{name}: skipped ({skipped[name]})")
            continue
        results[name] = bench_toc(name, blob, args)

    doc = {
        "benchmark": "toc-parse",
        "date": common.now_utc(),
        "machine": common.machine(switch_interval_s=sys.getswitchinterval()),
        "params": {"warm": args.warm, "cold": args.cold, "gil": args.gil},
        "skipped": skipped,
        "results": results,
    }
    headline = {
        name: {
            f"{part}_cpu_ms": {m: r[f"{part}_cpu_ms"][m]["median"] for m in ("old", "new")}
            for part in ("warm", "cold")
        }
        for name, r in results.items()
    }
    path = common.save(args, doc, headline)

    for name, r in results.items():
        print(f"\n{name} (CPU ms, median [min])     old: json.loads+build   new: build_json")
        for key in ("warm_cpu_ms", "cold_cpu_ms"):
            o, n = r[key]["old"], r[key]["new"]
            print(
                f"  {key:28} {o['median']:>9} [{o['min']}] {n['median']:>12} [{n['min']}]"
                f"   {o['median'] / n['median']:.2f}x"
            )
        for key in ("rss_kept_mb", "peak_mb"):
            o, n = r["cold_rss_mb"]["old"][key], r["cold_rss_mb"]["new"][key]
            print(f"  {'cold ' + key + ' (MB)':28} {o['median']:>9} {n['median']:>16}")
        if "new_scan_nogil_cpu_ms" in r:
            print(f"  {'json.loads alone':28} {r['old_json_loads_cpu_ms']['median']:>9}")
            scan = r["new_scan_nogil_cpu_ms"]["median"]
            print(f"  {'scan without the GIL':28} {'':>9} {scan:>16}")
        g = r["gil_ticker"]
        print(
            f"  {'ticker: longest wait':28} {g['old']['longest_wait_ms']['median']:>9}"
            f" {g['new']['longest_wait_ms']['median']:>16}"
        )
        if "baseline_old" in r:
            b = r["baseline_old"]
            print(
                f"  baseline old path ({b['src']}): warm {b['warm_cpu_ms']['median']},"
                f" cold {b['cold_cpu_ms']['median']}"
            )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
