"""TOC index: JSON parse, table build, lookup ns/op and bytes per entry, native vs pure.

A synthetic TOC of ``--entries`` entries (100k by default) is made from this machine's
``/usr`` tree (real names, depths and file sizes; the walk is repeated under new prefixes
if ``/usr`` is too small), with the chunk size chosen so that there are about
``--rows`` chunk rows (150k by default), and written as the Go tools write it (tab
indented JSON, ``chunkDigest`` on every chunk). Then, per backend:

- ``json.loads`` of the TOC (shared by both backends);
- building the table inputs from the parsed entries (the reader's Python loop, shared);
- ``ChunkTable(...)`` and ``NameTable(...)`` construction time;
- ``find()``, ``child()``, ``span()`` and ``children()`` ns/op over random probes that hit
  (median and p99 of single calls, timer overhead subtracted);
- bytes per entry: the tables' own ``nbytes`` and the memory tracemalloc sees allocated.

    python -m benchmarks.bench_tocindex [--entries 100000] [--rows 150000] [--repeats 5]

Writes ``results/tocindex.json`` and prints a summary. Never asserts speed.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import statistics
import time
import tracemalloc
from array import array

from benchmarks import common
from benchmarks.common import percentile
from stargz.estargz import tocbuild, tocindex


def walk_tree(root: str, want: int) -> list[tuple[str, str, int]]:
    """(path, type, size) in tar order, from a real tree, repeated under prefixes if short."""
    base: list[tuple[str, str, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, "/")
        base.append((rel + "/", "dir", 0))
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if os.path.islink(p):
                base.append((os.path.join(rel, name), "symlink", 0))
            else:
                base.append((os.path.join(rel, name), "reg", st.st_size))
        if len(base) >= want:
            break
    out = base[:want]
    copy = 1
    while len(out) < want:  # /usr too small: replicate under copyN/
        out.append((f"copy{copy}/", "dir", 0))
        out.extend((f"copy{copy}/{p}", t, s) for p, t, s in base[: want - len(out)])
        copy += 1
    return out[:want]


def make_toc(tree: list[tuple[str, str, int]], rows_wanted: int) -> tuple[str, int]:
    sizes = [s for _, t, s in tree if t == "reg" and s > 0]
    chunk = 4 << 20
    for c in (4 << 20, 1 << 20, 256 << 10, 64 << 10, 16 << 10, 4 << 10, 1 << 10):
        n = sum(-(-s // c) for s in sizes)
        if abs(n - rows_wanted) < abs(sum(-(-s // chunk) for s in sizes) - rows_wanted):
            chunk = c
    entries = []
    off = 0
    fake = hashlib.sha256(b"x").hexdigest()
    for path, typ, size in tree:
        e = {"name": path, "type": typ, "modtime": "2024-01-01T00:00:00Z", "mode": 0o644}
        if typ == "symlink":
            e["linkName"] = "target"
        if typ == "reg" and size:
            e.update(size=size, digest="sha256:" + fake)
            for k, co in enumerate(range(0, size, chunk)):
                if k:
                    e = {"name": path, "type": "chunk"}
                off += 100
                e.update(offset=off, chunkOffset=co, chunkDigest="sha256:" + fake)
                if size - co > chunk:
                    e["chunkSize"] = chunk
                entries.append(e)
        else:
            if typ == "reg":
                e["size"] = 0
            entries.append(e)
    return json.dumps({"version": 1, "entries": entries}, indent="\t"), chunk


def columns(toc: dict):
    """What the reader does: node ids, name rows, chunk rows (shared by both backends)."""
    ids: dict[str, int] = {"": 0}
    parents, names = array("q", [-1]), [b""]  # row 0 is the root; row i is node id i
    fid, coff, comp, inner, size = (array("q") for _ in range(5))
    digests = bytearray()
    cur, cur_size = 0, 0
    for e in toc["entries"]:
        name = e["name"].rstrip("/")
        if e["type"] != "chunk":
            parent, _, base = name.rpartition("/")
            cur = ids[name] = len(parents)
            parents.append(ids[parent])  # the synthetic TOC lists every directory first
            names.append(base.encode())
            cur_size = e.get("size", 0)
        if e["type"] in ("reg", "chunk") and "offset" in e:
            fid.append(cur)
            coff.append(e.get("chunkOffset", 0))
            comp.append(e["offset"])
            inner.append(e.get("innerOffset", 0))
            size.append(e.get("chunkSize") or cur_size - e.get("chunkOffset", 0))
            digests += bytes.fromhex(e["chunkDigest"][7:])
    return (parents, names), (fid, coff, comp, inner, size, bytes(digests))


def per_call_ns(fn, probes, repeats: int) -> tuple[float, float]:
    """Median and p99 ns of single calls, minus the timer's own overhead."""
    clock = time.perf_counter_ns
    empty = []
    for _ in range(20000):
        t = clock()
        empty.append(clock() - t)
    overhead = statistics.median(empty)
    samples = []
    for _ in range(repeats):
        for a, b in probes:
            t = clock()
            fn(a, b)
            samples.append(clock() - t - overhead)
    return statistics.median(samples), percentile(samples, 99)


def batch_ns(fn, probes) -> float:
    """ns/op of a tight loop (amortized; includes the loop, not the timer)."""
    t = time.perf_counter_ns()
    for a, b in probes:
        fn(a, b)
    return (time.perf_counter_ns() - t) / len(probes)


def measure_build(cls, args, repeats: int) -> tuple[float, object, int]:
    times = []
    table = None
    for _ in range(repeats):
        table = None
        gc.collect()
        t = time.perf_counter()
        table = cls(*args)
        times.append(time.perf_counter() - t)
    del table
    gc.collect()
    tracemalloc.start()
    table = cls(*args)
    traced = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return statistics.median(times), table, traced


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", default="/usr")
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--rows", type=int, default=150_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--probes", type=int, default=50_000)
    common.add_output_args(ap, "tocindex")
    args = ap.parse_args(argv)

    backends = {"python": tocindex.python}
    builders = {"python": tocbuild.python}
    if tocindex.native is not None:
        backends["native"] = tocindex.native
    if tocbuild.native is not None:
        builders["native"] = tocbuild.native
    else:
        print(f"native tocindex unavailable ({tocindex.native_error}); measuring the twin only")

    tree = walk_tree(args.tree, args.entries)
    text, chunk = make_toc(tree, args.rows)
    raw = text.encode()
    parse = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        toc = json.loads(raw)
        parse.append(time.perf_counter() - t)
    t = time.perf_counter()
    (parents, names), chunk_cols = columns(toc)
    cols_s = time.perf_counter() - t
    n_entries, n_rows = len(parents), len(chunk_cols[0])
    print(
        f"TOC: {n_entries} entries, {n_rows} chunk rows (chunk size {chunk}), "
        f"{len(raw) / 1e6:.1f} MB JSON; json.loads {statistics.median(parse) * 1e3:.0f} ms, "
        f"reader loop {cols_s * 1e3:.0f} ms"
    )

    rng = random.Random(42)
    file_rows = list(range(n_rows))
    chunk_probes = []
    fid, coff, _, _, size, _ = chunk_cols
    for i in rng.choices(file_rows, k=args.probes):
        chunk_probes.append((fid[i], coff[i] + rng.randrange(max(1, size[i]))))
    name_probes = [(parents[i], names[i]) for i in rng.choices(range(1, n_entries), k=args.probes)]
    miss_probes = [(p, n + b"~") for p, n in name_probes]

    results: dict = {}
    for bname, impl in backends.items():
        ct_s, ct, ct_traced = measure_build(impl.ChunkTable, chunk_cols, args.repeats)
        nt_s, nt, nt_traced = measure_build(impl.NameTable, (parents, names), args.repeats)
        for f, o in chunk_probes[:1000]:
            r = ct.find(f, o)
            assert r >= 0 and ct.row(r)[0] <= o
        for p, n in name_probes[:1000]:
            assert nt.child(p, n) >= 0
        find = per_call_ns(ct.find, chunk_probes, args.repeats)
        child = per_call_ns(nt.child, name_probes, args.repeats)
        child_miss = per_call_ns(nt.child, miss_probes, args.repeats)
        results[bname] = {
            "chunk_table_build_ms": round(ct_s * 1e3, 2),
            "name_table_build_ms": round(nt_s * 1e3, 2),
            "find_ns": {"median": round(find[0]), "p99": round(find[1])},
            "find_loop_ns": round(batch_ns(ct.find, chunk_probes)),
            "child_ns": {"median": round(child[0]), "p99": round(child[1])},
            "child_miss_ns": {"median": round(child_miss[0]), "p99": round(child_miss[1])},
            "child_loop_ns": round(batch_ns(nt.child, name_probes)),
            "span_loop_ns": round(batch_ns(lambda f, _o, ct=ct: ct.span(f), chunk_probes)),
            "children_loop_ns": round(batch_ns(lambda p, _n, nt=nt: nt.children(p), name_probes)),
            "chunk_table_nbytes_per_row": round(ct.nbytes / n_rows, 1),
            "chunk_table_traced_bytes_per_row": round(ct_traced / n_rows, 1),
            "name_table_nbytes_per_entry": round(nt.nbytes / n_entries, 1),
            "name_table_traced_bytes_per_entry": round(nt_traced / n_entries, 1),
            "bytes_per_entry_total": round((ct_traced + nt_traced) / n_entries, 1),
        }
        del ct, nt
        gc.collect()
        if bname in builders:
            payload_end = max(chunk_cols[2]) + 1
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                built = builders[bname].build(
                    toc["entries"], payload_end=payload_end, verify=True, max_chunk_size=1 << 30
                )
                times.append(time.perf_counter() - t)
            assert len(built.chunk_comp) == n_rows
            del built
            gc.collect()
            tracemalloc.start()
            built = builders[bname].build(
                toc["entries"], payload_end=payload_end, verify=True, max_chunk_size=1 << 30
            )
            traced = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            del built
            gc.collect()
            # the whole open-time pass of the reader: checks + inode tree + chunk columns
            results[bname]["tocbuild_ms"] = round(statistics.median(times) * 1e3, 1)
            results[bname]["tocbuild_traced_bytes_per_entry"] = round(traced / n_entries, 1)

    doc = {
        "benchmark": "tocindex",
        "date": common.now_utc(),
        "machine": common.machine(),
        "params": {
            "tree": args.tree,
            "entries": n_entries,
            "chunk_rows": n_rows,
            "chunk_size": chunk,
            "json_bytes": len(raw),
            "repeats": args.repeats,
            "probes": args.probes,
        },
        "shared": {
            "json_loads_ms": round(statistics.median(parse) * 1e3, 1),
            "reader_loop_ms": round(cols_s * 1e3, 1),
        },
        "results": results,
    }
    keys = ("chunk_table_build_ms", "name_table_build_ms", "find_ns", "child_ns", "tocbuild_ms")
    headline = {b: {k: r[k] for k in keys if k in r} for b, r in results.items()}
    path = common.save(args, doc, headline)

    keys = list(next(iter(results.values())))
    print(f"\n{'':36}" + "".join(f"{b:>18}" for b in results))
    for k in keys:
        print(f"{k:36}" + "".join(f"{str(results[b][k]):>18}" for b in results))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
