"""Memory and time of opening a TOC: a hostile deep name, and a real-sized layer.

Two TOCs, made here (no cache needed):

- ``deep``: one file under ``--depth`` levels of one-letter directories that have no
  entries of their own (``a/a/.../a/f``): each implied directory is a node. Before nodes
  kept only their name and parent, each kept its whole path: memory grew with the square
  of the depth.
- ``layer``: ``--entries`` entries shaped like a real layer (directories of 50 files,
  three levels deep, names of 10-30 characters, Go's fields and chunk digests).

For each: the native (or, with ``STARGZ_NO_EXTENSIONS=1``, the Python) ``build_json``
as the daemon's reader calls it; ``tracemalloc`` bytes kept with the result alive and at
the peak (the reader keeps the nodes and chunk rows, not ``by_path`` nor the dirent
rows: those are dropped before "kept" is read), and the median CPU time of ``--repeat``
calls (cyclic GC paused, as the reader does). Run it with ``PYTHONPATH`` at another
source tree to compare (an older builder has no ``max_depth``: the deep TOC is then
built without a limit).

    python benchmarks/bench_toc_memory.py [--depth 8000] [--entries 100000] [--repeat 7]

Prints one JSON object. Never asserts.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import statistics
import time
import tracemalloc

from stargz.estargz import tocbuild
from stargz.estargz.toc import TOC, TOCEntry, dump_toc

DIGEST = "sha256:" + "ab" * 32


def deep_toc(depth: int) -> bytes:
    name = "/".join(["a"] * depth) + "/f"
    return dump_toc(TOC(entries=[TOCEntry(name=name, type="reg", mode=0o644)]))


def layer_toc(n: int) -> bytes:
    entries = []
    off = 0
    d = 0
    while len(entries) < n:
        top, mid, low = d // 400, (d // 20) % 20, d % 20
        path = f"usr/lib{top:03d}/package-{mid:02d}/module_{low:02d}"
        d += 1
        for p in (f"usr/lib{top:03d}", f"usr/lib{top:03d}/package-{mid:02d}", path):
            entries.append(TOCEntry(name=p + "/", type="dir", mode=0o755, modtime="2024"))
        for k in range(50):
            size = 1000 + k * 37
            entries.append(
                TOCEntry(
                    name=f"{path}/file_{k:04d}_{'x' * (k % 20)}.py",
                    type="reg",
                    size=size,
                    mode=0o644,
                    modtime="2024-01-01T00:00:00Z",
                    offset=off,
                    digest=DIGEST,
                    chunk_digest=DIGEST,
                )
            )
            off += 512 + size // 3
    return dump_toc(TOC(entries=entries[:n]))


def measure(data: bytes, repeat: int, kw: dict) -> dict:
    kw = {"payload_end": 1 << 62, "verify": True, "max_chunk_size": 1 << 30, **kw}
    gc.collect()
    gc.disable()
    try:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        try:
            built = tocbuild.build_json(data, **kw)
        except Exception as e:  # noqa: BLE001 - a refusal is the result
            built, refused = None, f"{type(e).__name__}: {str(e)[:160]}"
        else:
            refused = None
            built.by_path = {}  # the reader does not keep it (nor the dirent rows)
            built.dirent_parent = built.dirent_name = built.dirent_target = None
        kept, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out = {
            "toc_bytes": len(data),
            "kept_bytes": kept - base,
            "peak_bytes": peak - base,
            "refused": refused,
            "nodes": None if built is None else len(built.nodes),
        }
        del built
        times = []
        for _ in range(repeat):
            t0 = time.process_time()
            try:
                tocbuild.build_json(data, **kw)
            except Exception:  # noqa: BLE001, S110 - timed either way
                pass
            times.append(time.process_time() - t0)
        out["cpu_ms_median"] = round(statistics.median(times) * 1000, 2)
        out["cpu_ms_min"] = round(min(times) * 1000, 2)
    finally:
        gc.enable()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=8000)
    p.add_argument("--entries", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args()
    has_limits = "max_depth" in str(inspect.signature(tocbuild.python.build))
    result = {"backend": tocbuild.backend, "limits": has_limits}
    deep = deep_toc(args.depth)
    result["deep"] = measure(deep, 3, {})
    if has_limits:  # the same work with the depth allowed, to see what a node costs now
        result["deep_allowed"] = measure(deep, 3, {"max_depth": args.depth + 1})
    result["layer"] = measure(layer_toc(args.entries), args.repeat, {})
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
