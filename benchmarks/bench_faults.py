"""The fault matrix, in full: every fault of ``tests/harness/faultmatrix.py`` on a fresh
daemon, every file of the faulted layer read in 128 KiB slices, the registry gone for a
minute. Prints the table (fault, reads tried, ok, EIO, wrong bytes, hangs, crashes, the
longest read, slices unreadable after the fault, the other layer's reads) and writes
``results/faults.json``; exits 1 if any fault broke an invariant.

    python -m benchmarks.bench_faults [--outage 60] [--reads N] [--only NAME ...]

Run as root (FUSE, tmpfs mounts, containerd); ``ci/faults.sh`` sets the machine up first.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from benchmarks.common import add_output_args, log, machine, save
from tests.harness.faultmatrix import Row, Timing, faults, run_matrix, table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outage", type=float, default=60, help="seconds the registry is gone")
    ap.add_argument(
        "--reads", type=int, default=0, help="slices read per fault (default 0: every one)"
    )
    ap.add_argument("--only", nargs="*", default=[], help="run only the faults named")
    ap.add_argument(
        "--fetching-timeout",
        type=int,
        default=Timing.fetching_timeout_sec,
        help="[blob] fetching_timeout_sec of the daemons",
    )
    add_output_args(ap, "faults")
    args = ap.parse_args(argv)
    timing = Timing(fetching_timeout_sec=args.fetching_timeout)
    chosen = [f for f in faults(timing, args.outage) if not args.only or f.name in args.only]
    if not chosen:
        ap.error(f"no fault named {args.only}")

    def progress(row: Row) -> None:
        log(f"{row.fault}: {row.ok}/{row.reads} ok, {row.eio} EIO, {row.seconds} s")

    rows = run_matrix(chosen, timing, read_limit=args.reads or None, progress=progress)
    print(table(rows))
    data = {
        "timing": dataclasses.asdict(timing),
        "outage_sec": args.outage,
        "machine": machine(),
        "rows": [{**dataclasses.asdict(r), "violations": r.violations()} for r in rows],
    }
    failed = [r.fault for r in rows if r.violations()]
    path = save(
        args,
        data,
        {
            "faults": len(rows),
            "failed": failed,
            "reads": sum(r.reads for r in rows),
            "wrong": sum(r.wrong for r in rows),
            "hangs": sum(r.hangs for r in rows),
            "crashes": sum(r.crashes for r in rows),
            "longest_s": max((r.longest_s for r in rows), default=0),
        },
    )
    log(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
