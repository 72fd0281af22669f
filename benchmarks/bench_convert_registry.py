"""Registry-to-registry ``stargz convert``: peak memory and time against layer size.

Shows that memory does not grow with the layer (blobs travel through files in 1 MiB
pieces). For each size, an image with one gzip layer of that many MiB of incompressible
8 MiB files is built, pushed to a private docker-registry (skopeo), and converted with
``stargz convert -q SRC DST`` in a fresh process; its peak RSS (``ru_maxrss`` of that
process alone, from ``wait4``) and wall time are recorded, over ``--trials`` runs (each
to a new repository, so nothing is skipped as already there).
Writes ``results/convert-registry.json``.

    python -m benchmarks.bench_convert_registry [--sizes 32,256] [--trials 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

from benchmarks import common
from benchmarks.common import log, median
from tests.harness.procs import REPO, Registry, make_tempdir

_BUILD = """
import os, sys
from pathlib import Path
from tests.harness.oci import build_image
out, mb = Path(sys.argv[1]), int(sys.argv[2])
files = {f"data/f{i}.bin": os.urandom(8 << 20) for i in range(max(1, mb // 8))}
build_image(out, "1", [files], level=1)
"""


def convert_once(src: str, dst: str) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of one ``stargz convert`` in its own process (the
    rusage of that process alone, from ``wait4``)."""
    t = time.perf_counter()
    p = subprocess.Popen(
        [sys.executable, "-m", "stargz.cli.main", "convert", "-q", src, dst],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert p.stderr is not None
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    secs = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"convert failed: {err.decode(errors='replace')}")
    return secs, usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="32,256", help="layer sizes in MiB")
    ap.add_argument("--trials", type=int, default=3)
    common.add_output_args(ap, "convert-registry")
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    data: dict = {"benchmark": "convert-registry", "machine": common.machine(), "sizes": {}}
    reg = Registry.start()
    try:
        for mb in sizes:
            work = make_tempdir("bench-cvreg-")
            try:
                # built in another process: a child's ru_maxrss starts from the RSS its
                # parent had when it forked, so this one must stay small
                subprocess.run(
                    [sys.executable, "-c", _BUILD, str(work / "img"), str(mb)],
                    check=True,
                    cwd=REPO,
                    env={**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{REPO}"},
                )
                src = reg.push_oci(work / "img", "1", f"src{mb}:1")
                runs = []
                for t in range(args.trials):
                    secs, rss = convert_once(src, reg.ref(f"dst{mb}-{t}:esgz"))
                    runs.append({"seconds": round(secs, 3), "peak_rss_bytes": rss})
                    log(f"{mb} MiB: {secs:.2f}s, peak RSS {rss / 1e6:.0f} MB")
            finally:
                shutil.rmtree(work, ignore_errors=True)
            data["sizes"][str(mb)] = {
                "runs": runs,
                "seconds_median": median(r["seconds"] for r in runs),
                "peak_rss_mb_max": round(max(r["peak_rss_bytes"] for r in runs) / 1e6, 1),
            }
            common.checkpoint(args, data)
    finally:
        reg.close()
    headline = {f"{mb}MiB_peak_rss_mb": data["sizes"][str(mb)]["peak_rss_mb_max"] for mb in sizes}
    log(f"wrote {common.save(args, data, headline)}")


if __name__ == "__main__":
    main()
