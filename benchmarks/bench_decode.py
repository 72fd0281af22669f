"""Chunk decode + sha256 verify throughput: native (ISA-L/libzstd/OpenSSL) vs pure Python.

The input is a tar of this machine's files (``/usr/lib/python3.11`` by default), cut into
4 MiB chunks as eStargz does, each chunk compressed on its own: a gzip member at level 9
(the Go writer's default) and a zstd frame at level 3 (zstd:chunked's). Every contender
decodes every chunk ``--repeats`` times through ``decode_chunk(..., digest, exclusive=True)``;
MB/s are of *output* bytes. Also measured: sha256 alone, decoding on N threads at once (the
native code releases the GIL), and what a fresh zstd context per call would cost.

    python -m benchmarks.bench_decode [--mib 32] [--repeats 5] [--tree /usr/share]

Writes ``results/decode.json`` and prints a summary. Never asserts speed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import tarfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import zstandard

from benchmarks import common
from benchmarks.common import percentile
from stargz.estargz import codec

CHUNK = 4 << 20


def make_tar(tree: str, limit: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(tree):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if not os.path.isfile(path) or os.path.islink(path):
                    continue
                tf.add(path, arcname=os.path.relpath(path, "/"), recursive=False)
                if buf.tell() >= limit:
                    return buf.getvalue()[:limit]
    return buf.getvalue()[:limit]


def gzip_member(data: bytes) -> bytes:
    # Go's compress/gzip header (no name, OS=255), deflate level 9, CRC32 + ISIZE trailer.
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = co.compress(data) + co.flush()
    return (
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
        + body
        + zlib.crc32(data).to_bytes(4, "little")
        + (len(data) & 0xFFFFFFFF).to_bytes(4, "little")
    )


def zstd_frame(data: bytes) -> bytes:
    # Streaming (no content size in the header, 8 MiB-class window) like the Go writer.
    out = io.BytesIO()
    with zstandard.ZstdCompressor(level=3, write_checksum=True).stream_writer(
        out, closefd=False
    ) as w:
        w.write(data)
    return out.getvalue()


def time_calls(fn, items, repeats: int) -> list[float]:
    """Seconds per call, over all items, repeated."""
    out = []
    for _ in range(repeats):
        for item in items:
            t = time.perf_counter()
            fn(*item)
            out.append(time.perf_counter() - t)
    return out


def summarize(seconds: list[float], nbytes: list[int]) -> dict:
    rates = [b / s / 1e6 for b, s in zip(nbytes, seconds, strict=True)]
    return {
        "calls": len(seconds),
        "mb_per_s_median": round(statistics.median(rates), 1),
        # p99 of latency = the slow tail: the 1st percentile of throughput
        "mb_per_s_p99_slowest": round(percentile(rates, 1), 1),
        "ms_per_call_median": round(statistics.median(seconds) * 1e3, 3),
        "ms_per_call_p99": round(percentile(seconds, 99) * 1e3, 3),
        "aggregate_mb_per_s": round(sum(nbytes) / sum(seconds) / 1e6, 1),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", default="/usr/lib/python3.11")
    ap.add_argument("--mib", type=int, default=32, help="tar size to cut into 4 MiB chunks")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    common.add_output_args(ap, "decode")
    args = ap.parse_args(argv)

    backends = {"python": codec.python}
    if codec.native is not None:
        backends["native"] = codec.native
    else:
        print(f"native codec unavailable ({codec.native_error}); measuring the twin only")

    t = time.perf_counter()
    tar = make_tar(args.tree, args.mib << 20)
    chunks = [tar[i : i + CHUNK] for i in range(0, len(tar), CHUNK)]
    digests = [hashlib.sha256(c).digest() for c in chunks]
    members = {"gzip": [gzip_member(c) for c in chunks], "zstd": [zstd_frame(c) for c in chunks]}
    prep = time.perf_counter() - t
    sizes = [len(c) for c in chunks]
    ratio = {k: round(sum(len(m) for m in v) / len(tar), 3) for k, v in members.items()}
    print(
        f"{len(tar) >> 20} MiB tar of {args.tree} in {len(chunks)} chunks; compressed ratio "
        f"{ratio}; prepared in {prep:.1f} s"
    )

    results: dict = {"decode": {}, "sha256": {}, "threads": {}, "zstd_context": {}}
    for compression, ms in members.items():
        for name, impl in backends.items():
            items = [
                (m, compression, 0, len(c), d, True)
                for m, c, d in zip(ms, chunks, digests, strict=True)
            ]
            impl.decode_chunk(*items[0])  # warm up (and check)
            secs = time_calls(impl.decode_chunk, items, args.repeats)
            results["decode"][f"{compression}/{name}"] = summarize(secs, sizes * args.repeats)

    for name, impl in backends.items():
        secs = time_calls(impl.sha256, [(c,) for c in chunks], args.repeats)
        results["sha256"][name] = summarize(secs, sizes * args.repeats)

    # Threads: the same work on 1 and N threads; wall-clock aggregate MB/s.
    for compression, ms in members.items():
        for name, impl in backends.items():
            items = [
                (m, compression, 0, len(c), d, True)
                for m, c, d in zip(ms, chunks, digests, strict=True)
            ] * args.repeats
            for n in sorted({1, args.threads}):
                with ThreadPoolExecutor(n) as pool:
                    t = time.perf_counter()
                    list(pool.map(lambda it, impl=impl: impl.decode_chunk(*it), items))
                    wall = time.perf_counter() - t
                results["threads"][f"{compression}/{name}/{n}"] = round(
                    sum(sizes) * args.repeats / wall / 1e6, 1
                )

    # What one ZSTD_DCtx per call would cost (zstandard package: fresh vs reused context).
    reused = zstandard.ZstdDecompressor()
    frames = members["zstd"]
    fresh = time_calls(
        lambda f: zstandard.ZstdDecompressor().decompress(f, max_output_size=CHUNK),
        [(f,) for f in frames],
        args.repeats,
    )
    kept = time_calls(
        lambda f: reused.decompress(f, max_output_size=CHUNK), [(f,) for f in frames], args.repeats
    )
    t = time.perf_counter()
    for _ in range(1000):
        zstandard.ZstdDecompressor()
    results["zstd_context"] = {
        "fresh_context_ms_median": round(statistics.median(fresh) * 1e3, 3),
        "reused_context_ms_median": round(statistics.median(kept) * 1e3, 3),
        "create_only_us": round((time.perf_counter() - t) / 1000 * 1e6, 2),
    }

    for compression in members:
        n = results["decode"].get(f"{compression}/native")
        p = results["decode"][f"{compression}/python"]
        if n:
            results["decode"][f"{compression}/ratio_native_over_python"] = round(
                n["mb_per_s_median"] / p["mb_per_s_median"], 2
            )

    doc = {
        "benchmark": "decode",
        "date": common.now_utc(),
        "machine": common.machine(zstandard=zstandard.__version__),
        "params": {
            "tree": args.tree,
            "tar_bytes": len(tar),
            "chunk": CHUNK,
            "chunks": len(chunks),
            "repeats": args.repeats,
            "threads": args.threads,
            "compressed_ratio": ratio,
        },
        "results": results,
    }
    headline = {
        k: v["mb_per_s_median"] if isinstance(v, dict) else v for k, v in results["decode"].items()
    }
    headline["sha256"] = {k: v["mb_per_s_median"] for k, v in results["sha256"].items()}
    path = common.save(args, doc, headline)

    head = f"{'median':>8} {'p99 slow':>9} {'ms med':>8} {'ms p99':>8}"
    print(f"\n{'decode+verify (output MB/s)':34} {head}")
    for key, r in results["decode"].items():
        if isinstance(r, dict):
            print(
                f"{key:34} {r['mb_per_s_median']:8} {r['mb_per_s_p99_slowest']:9} "
                f"{r['ms_per_call_median']:8} {r['ms_per_call_p99']:8}"
            )
        else:
            print(f"{key:34} {r:8}x")
    for key, r in results["sha256"].items():
        print(f"{'sha256/' + key:34} {r['mb_per_s_median']:8} {r['mb_per_s_p99_slowest']:9}")
    print("threads (wall MB/s):", results["threads"])
    print("zstd context:", results["zstd_context"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
