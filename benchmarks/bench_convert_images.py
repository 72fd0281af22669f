"""Converter throughput and output size on the HelloBench images: ours vs Go, one run.

Input: the ``orig`` tag (one gzip layer of a Debian minbase rootfs) of each cached HelloBench
layout ``/var/cache/stargz-bench/oci/<image>`` (built by ``bench_hellobench.py``). The image
is hard-linked (blobs are immutable) into a private OCI layout in a temporary directory, so
the cached layouts never get extra tags. Contenders:

* ``ours-level1``   ``stargz convert --compression-level 1`` (ISA-L, the fastest)
* ``ours-level5``   ``stargz convert --compression-level 5`` (libdeflate, about Go's size)
* ``ours-level9``   ``stargz convert --compression-level 9`` (libdeflate, Go's default level)
* ``go-level9``     ``ctr-remote i convert --oci --estargz`` (its default level, 9) inside a
                    private containerd, as ``bench_convert.py`` does: the image is imported
                    once (``ctr i import --no-unpack``), only the convert is timed, and the
                    output image is removed (``ctr i rm --sync``) after every trial.

Each round runs every (image, contender) once, shuffled. Reported per image and contender:
seconds median/p95, MB/s of uncompressed input (the orig layer's tar size), output bytes
(sum of the converted layers), CPU seconds (``ours``: the converter process; ``go``:
``ctr-remote``, which converts client-side, plus the containerd serving its content store),
and ratios ours/Go. Writes ``results/convert-images.json`` (progress in ``.partial.json``).

    python -m benchmarks.bench_convert_images [--trials 3]
        [--images python,gcc,nginx] [--contenders ours-level1,ours-level5,ours-level9,go-level9]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from benchmarks import common
from benchmarks._images import go_image_layers_size, layout_layers_size
from benchmarks.common import CACHE, log, percentile
from stargz.image.layout import Layout
from tests.harness.procs import Containerd, run

CONTENDERS = ["ours-level1", "ours-level5", "ours-level9", "go-level9"]
NS = "bench"


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def private_copy(src_dir: Path, tag: str, dst_dir: Path) -> dict:
    """``dst_dir`` = OCI layout holding only ``src_dir:tag`` (blobs hard-linked, or copied
    across filesystems). Returns the manifest."""
    src = Layout(str(src_dir))
    dst = Layout(str(dst_dir), create=True)
    desc = src.resolve(tag)
    man = src.read_json(desc["digest"])
    for d in [desc["digest"], man["config"]["digest"], *(x["digest"] for x in man["layers"])]:
        target = dst.blob_path(d)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.link(src.blob_path(d), target)
        except OSError:
            shutil.copyfile(src.blob_path(d), target)
    dst.tag({k: desc[k] for k in ("mediaType", "digest", "size")}, tag)
    return man


def tar_size(path: str) -> int:
    """Uncompressed size of a gzip blob (all members)."""
    n = 0
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    with open(path, "rb") as f:
        while buf := f.read(1 << 20):
            while buf:
                n += len(d.decompress(buf))
                buf = d.unused_data if d.eof else b""
                if d.eof:
                    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        n += len(d.flush())
    return n


def convert_ours(layout: Path, level: str | None, tag: str) -> None:
    flags = [] if level is None else ["--compression-level", level]
    run(
        [
            sys.executable,
            "-m",
            "stargz.cli.main",
            "convert",
            "-q",
            *flags,
            f"oci:{layout}:orig",
            f"oci:{layout}:{tag}",
        ],
        timeout=7200,
    )


def drop_ours(layout: Path, tag: str) -> None:
    """Remove tag ``tag`` and its blobs (keeps the private layout small between trials)."""
    lay = Layout(str(layout))
    keep: set[str] = set()
    drop: set[str] = set()
    idx = lay.index()
    for m in idx["manifests"]:
        name = m.get("annotations", {}).get("org.opencontainers.image.ref.name")
        man = lay.read_json(m["digest"])
        ds = {m["digest"], man["config"]["digest"], *(x["digest"] for x in man["layers"])}
        if name == tag:
            drop = ds
        else:
            keep |= ds
    for d in drop - keep:
        os.unlink(lay.blob_path(d))
    idx["manifests"] = [
        m
        for m in idx["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag
    ]
    Path(layout, "index.json").write_text(json.dumps(idx, indent=2) + "\n")


def summarize(trials: list[dict], inputs: dict) -> dict:
    out: dict = {}
    for img in inputs:
        per: dict = {}
        for c in CONTENDERS:
            ts = [
                t for t in trials if t["image"] == img and t["contender"] == c and "error" not in t
            ]
            if not ts:
                continue
            secs = [t["seconds"] for t in ts]
            med = statistics.median(secs)
            per[c] = {
                "n": len(ts),
                "seconds_median": med,
                "seconds_p95": percentile(secs, 95),
                "seconds_min": min(secs),
                "seconds_max": max(secs),
                "mb_per_s": inputs[img]["uncompressed_bytes"] / 1e6 / med,
                "output_bytes": statistics.median(t["output_bytes"] for t in ts),
                "output_bytes_all_equal": len({t["output_bytes"] for t in ts}) == 1,
                "cpu_s_median": statistics.median(t["cpu_s"] for t in ts),
                "trials_s": secs,
            }
        ratios = {}
        go = per.get("go-level9")
        for c in ("ours-level1", "ours-level5", "ours-level9"):
            if go and c in per:
                ratios[f"{c}/go-level9"] = {
                    "throughput_ratio": per[c]["mb_per_s"] / go["mb_per_s"],
                    "size_ratio": per[c]["output_bytes"] / go["output_bytes"],
                    "cpu_ratio": per[c]["cpu_s_median"] / go["cpu_s_median"],
                }
        out[img] = {"contenders": per, "ratios_ours_over_go": ratios}
    return out


def headline(summ: dict) -> dict:
    """Per image: median seconds and output MB of each contender."""
    return {
        img: {
            c: {"s": round(v["seconds_median"], 2), "MB": round(v["output_bytes"] / 1e6, 1)}
            for c, v in s["contenders"].items()
        }
        for img, s in summ.items()
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--images", default="python,gcc,nginx")
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--seed", type=int, default=0)
    common.add_output_args(ap, "convert-images")
    args = ap.parse_args(argv)
    images = [i for i in args.images.split(",") if i]
    contenders = [c for c in args.contenders.split(",") if c]
    assert set(contenders) <= set(CONTENDERS), contenders
    now = _dt.datetime.now(_dt.UTC)
    rng = random.Random(args.seed or int(now.timestamp()))
    base = Path(tempfile.mkdtemp(prefix="bench-cvimg-", dir="/var/tmp"))
    t_start = time.perf_counter()
    doc: dict = {
        "benchmark": "convert-images",
        "date": now.isoformat(timespec="seconds"),
        "machine": common.machine(),
        "method": __doc__.strip().splitlines()[0],
        "notes": [
            "input: the orig tag of /var/cache/stargz-bench/oci/<image> (one gzip layer, "
            "level 6), uncompressed_bytes = its tar size",
            "ours-level1 = stargz convert --compression-level 1 (ISA-L); ours-level5/9 = "
            "--compression-level 5/9 (libdeflate); go-level9 = ctr-remote i convert --oci "
            "--estargz (default level 9), timed without the one-time import",
            "mb_per_s = uncompressed input MB / median seconds; ratios: throughput and cpu "
            "ours/Go (throughput > 1: ours faster), size ours/Go (< 1: ours smaller)",
            "cpu_s: ours = converter process; go = ctr-remote (converts client-side) + the "
            "private containerd's CPU during the convert",
        ],
        "inputs": {},
        "trials": [],
    }
    cd = None
    try:
        refs: dict[str, str] = {}
        for img in images:
            lay = base / img
            man = private_copy(CACHE / "oci" / img, "orig", lay)
            doc["inputs"][img] = {
                "layers": len(man["layers"]),
                "compressed_bytes": sum(x["size"] for x in man["layers"]),
                "uncompressed_bytes": sum(
                    tar_size(Layout(str(lay)).blob_path(x["digest"])) for x in man["layers"]
                ),
            }
            log(f"{img}: {doc['inputs'][img]}")
        if any(c.startswith("go") for c in contenders):
            cd = Containerd.start(str(base / "unused-stargz.sock"))
            for img in images:
                archive = base / f"{img}.tar"
                subprocess.run(["tar", "-C", str(base / img), "-cf", str(archive), "."], check=True)
                cd.ctr(
                    "i", "import", "--no-unpack", "--base-name", f"bench/{img}", str(archive), ns=NS
                )
                archive.unlink()
                names = cd.ctr("i", "ls", "-q", ns=NS).stdout.split()
                refs[img] = next(n for n in names if n == f"bench/{img}:orig")
        for r in range(args.trials):
            order = [(i, c) for i in images for c in contenders]
            rng.shuffle(order)
            for img, c in order:
                t: dict = {"image": img, "contender": c, "round": r, "loadavg": os.getloadavg()}
                try:
                    if c.startswith("ours"):
                        tag = f"{c}-{r}"
                        lay = base / img
                        c0 = children_cpu()
                        t0 = time.perf_counter()
                        convert_ours(lay, c.removeprefix("ours-level"), tag)
                        t["seconds"] = time.perf_counter() - t0
                        t["cpu_s"] = children_cpu() - c0
                        t["output_bytes"] = layout_layers_size(str(lay), tag)
                        drop_ours(lay, tag)
                    else:
                        assert cd is not None
                        dst = f"bench/{img}:go-{r}"
                        c0, d0 = children_cpu(), common.proc_usage(cd.pid)["cpu_s"]
                        t0 = time.perf_counter()
                        run(
                            [
                                "ctr-remote",
                                *("-a", cd.address, "-n", NS),
                                *("i", "convert", "--oci", "--estargz", refs[img], dst),
                            ],
                            timeout=7200,
                        )
                        t["seconds"] = time.perf_counter() - t0
                        t["cpu_s_client"] = children_cpu() - c0
                        t["cpu_s_containerd"] = common.proc_usage(cd.pid)["cpu_s"] - d0
                        t["cpu_s"] = t["cpu_s_client"] + t["cpu_s_containerd"]
                        t["output_bytes"] = go_image_layers_size(cd, dst, NS)
                        cd.ctr("i", "rm", "--sync", dst, check=False, ns=NS)
                except Exception as e:  # record and go on
                    t["error"] = repr(e)[-2000:]
                doc["trials"].append(t)
                log(json.dumps(t))
                doc["summary"] = summarize(doc["trials"], doc["inputs"])
                common.checkpoint(args, doc)
    finally:
        if cd is not None:
            cd.close()
        shutil.rmtree(base, ignore_errors=True)
    doc["summary"] = summarize(doc["trials"], doc["inputs"])
    doc["wall_s"] = time.perf_counter() - t_start
    out = common.save(args, doc, headline(doc["summary"]))
    cols = ("med s", "p95 s", "MB/s", "out MB", "cpu s")
    print(f"{'image':7} {'contender':13} " + " ".join(f"{c:>7}" for c in cols))
    for img, s in doc["summary"].items():
        for c, v in s["contenders"].items():
            print(
                f"{img:7} {c:13} {v['seconds_median']:7.2f} {v['seconds_p95']:7.2f} "
                f"{v['mb_per_s']:7.1f} {v['output_bytes'] / 1e6:7.2f} {v['cpu_s_median']:7.1f}"
            )
        for k, v in s["ratios_ours_over_go"].items():
            print(
                f"{img:7} {k:25} throughput x{v['throughput_ratio']:.2f} "
                f"size x{v['size_ratio']:.3f} cpu x{v['cpu_ratio']:.2f}"
            )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
