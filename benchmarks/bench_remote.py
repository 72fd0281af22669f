"""Registry range-read throughput: stargz.remote against a local docker-registry.

Starts the CNCF distribution registry (Debian ``docker-registry``) on 127.0.0.1 with a
temporary storage dir, pushes one random blob, and measures random range reads of
``--range-size`` bytes (default 50 000 = ``[blob] chunk_size``) with N concurrent
readers for each contender:

- ``baseline-httpclient``: N threads, each a keep-alive ``http.client`` connection doing
  single-range GETs: what the server gives to a minimal client (the ceiling).
- ``single``: ``BlobReader.read_at`` (one range per request).
- ``multi``: ``BlobReader.read_ranges`` with ``--ranges-per-call`` ranges in ONE
  multi-range request (``multipart/byteranges``).
- ``multi-forced-single``: the same calls with ``force_single_range_mode``: one
  request per range, in parallel.

Note: distribution's filesystem driver reads 4 MiB from disk for every blob GET (its
file-reader buffer), so each request costs the server several ms whatever its range;
coalescing ranges into one request is what wins against a real registry.

    python -m benchmarks.bench_remote [--seconds 3] [--concurrency 1,8,32]

Writes ``results/remote.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import random
import threading
import time
import urllib.request
from urllib.parse import urljoin

import aiohttp
import uvloop

from benchmarks import common
from benchmarks.common import percentile
from stargz.remote import BlobOptions, RegistryClient
from tests.harness.procs import Registry, make_tempdir


def push_blob(host: str, repo: str, data: bytes) -> str:
    """Upload ``data`` as a blob of ``repo`` (monolithic POST + PUT); returns its digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    req = urllib.request.Request(f"http://{host}/v2/{repo}/blobs/uploads/", data=b"", method="POST")
    with urllib.request.urlopen(req) as r:
        loc = urljoin(f"http://{host}/", r.headers["Location"])
    sep = "&" if "?" in loc else "?"
    req = urllib.request.Request(
        f"{loc}{sep}digest={digest}",
        data=data,
        method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(req) as r:
        assert r.status == 201
    return digest


def summarize(
    calls: int, ranges: int, nbytes: int, requests: int, secs: float, lat: list, cpu: float
):
    return {
        "calls": calls,
        "ranges": ranges,
        "requests": requests,
        "seconds": round(secs, 3),
        "requests_per_s": round(requests / secs, 1),
        "ranges_per_s": round(ranges / secs, 1),
        "mb_per_s": round(nbytes / secs / 1e6, 2),
        "ms_per_call_p50": round(common.median(lat) * 1000, 2),
        "ms_per_call_p99": round(percentile(lat, 99) * 1000, 2),
        # CPU time of this (client) process only; the registry is another process
        "client_cpu_us_per_request": round(cpu / max(requests, 1) * 1e6, 1),
        "client_cpu_us_per_range": round(cpu / max(ranges, 1) * 1e6, 1),
    }


def baseline(host: str, path: str, size: int, rsize: int, conc: int, seconds: float, seed: int):
    """N threads, one keep-alive http.client connection each, single-range GETs."""
    lat: list[float] = []
    totals = [0, 0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(i: int) -> None:
        rnd = random.Random(seed + i)
        h, _, p = host.partition(":")
        conn = http.client.HTTPConnection(h, int(p), timeout=30)
        mine, n, b = [], 0, 0
        while time.perf_counter() < stop_at:
            off = rnd.randrange(size - rsize)
            t = time.perf_counter()
            conn.request("GET", path, headers={"Range": f"bytes={off}-{off + rsize - 1}"})
            r = conn.getresponse()
            data = r.read()
            assert r.status == 206 and len(data) == rsize, r.status
            mine.append(time.perf_counter() - t)
            n += 1
            b += len(data)
        conn.close()
        with lock:
            lat.extend(mine)
            totals[0] += n
            totals[1] += b

    t0, c0 = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    return summarize(totals[0], totals[0], totals[1], totals[0], secs, lat, cpu)


async def ours(
    ref: str,
    digest: str,
    data: bytes,
    mode: str,
    rsize: int,
    per_call: int,
    conc: int,
    seconds: float,
    seed: int,
    check: bool,
):
    opts = BlobOptions(force_single_range_mode=(mode == "multi-forced-single"))
    async with RegistryClient(blob=opts, keychain=None, max_connections=max(64, conc)) as c:
        blob = await c.open_blob(ref, digest)
        size = blob.size
        lat: list[float] = []
        counts = [0, 0, 0]
        stop_at = time.perf_counter() + seconds
        base_requests = blob.stats.requests

        async def reader(i: int) -> None:
            rnd = random.Random(seed + i)
            while time.perf_counter() < stop_at:
                if mode == "single":
                    spans = [(rnd.randrange(size - rsize), rsize)]
                else:
                    # disjoint ranges at least a chunk apart so they are not merged
                    starts = sorted(rnd.sample(range(0, size - rsize, 2 * rsize), per_call))
                    spans = [(s, rsize) for s in starts]
                t = time.perf_counter()
                if len(spans) == 1:
                    got = [await blob.read_at(*spans[0])]
                else:
                    got = await blob.read_ranges(spans)
                lat.append(time.perf_counter() - t)
                if check:
                    assert got == [data[o : o + n] for o, n in spans]
                counts[0] += 1
                counts[1] += len(spans)
                counts[2] += sum(len(g) for g in got)

        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(reader(i) for i in range(conc)))
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        requests = blob.stats.requests - base_requests
        out = summarize(counts[0], counts[1], counts[2], requests, secs, lat, cpu)
        out["retries"] = blob.stats.retries
        out["multi_range_fallbacks"] = blob.stats.multi_range_fallbacks
        return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blob-mib", type=int, default=64)
    ap.add_argument("--range-size", type=int, default=50_000)
    ap.add_argument("--ranges-per-call", type=int, default=16)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--check", action="store_true", help="compare every read with the blob")
    common.add_output_args(ap, "remote")
    args = ap.parse_args(argv)
    concs = [int(x) for x in args.concurrency.split(",")]

    base = make_tempdir("bench-remote-")
    reg = Registry.start(base)
    try:
        data = random.Random(42).randbytes(args.blob_mib << 20)
        digest = push_blob(reg.host, "bench", data)
        ref = f"{reg.host}/bench"
        path = f"/v2/bench/blobs/{digest}"
        results: dict[str, dict] = {}
        for conc in concs:
            key = f"baseline-httpclient/c{conc}"
            results[key] = baseline(
                reg.host, path, len(data), args.range_size, conc, args.seconds, 1
            )
            print(key, results[key], flush=True)
            for mode in ("single", "multi", "multi-forced-single"):
                factory = uvloop.new_event_loop if args.loop == "uvloop" else None
                with asyncio.Runner(loop_factory=factory) as runner:
                    r = runner.run(
                        ours(
                            ref,
                            digest,
                            data,
                            mode,
                            args.range_size,
                            args.ranges_per_call,
                            conc,
                            args.seconds,
                            1,
                            args.check,
                        )
                    )
                key = f"{mode}/c{conc}"
                results[key] = r
                print(key, r, flush=True)
        doc = {
            "benchmark": "remote",
            "date": common.now_utc(),
            "machine": common.machine(
                aiohttp=aiohttp.__version__,
                uvloop=uvloop.__version__,
                registry=common.tool_version(["docker-registry", "--version"]),
            ),
            "params": {
                "blob_bytes": len(data),
                "range_size": args.range_size,
                "ranges_per_call": args.ranges_per_call,
                "seconds_per_run": args.seconds,
                "loop": args.loop,
                "concurrency": concs,
                "checked": args.check,
            },
            "notes": (
                "Client and registry share this machine's CPUs. The registry reads 4 MiB "
                "per blob GET (distribution file-reader buffer), so requests/s is bounded "
                "by the server; ranges_per_s shows what multi-range coalescing buys."
            ),
            "results": results,
        }
        headline = {k: r["ranges_per_s"] for k, r in results.items()}
        print("wrote", common.save(args, doc, headline))
    finally:
        reg.close()  # (removes its work dir)


if __name__ == "__main__":
    main()
