"""What every benchmark shares: the machine it ran on, percentiles, and its result files.

A benchmark writes its latest result to ``results/<name>.json`` (overwritten by the next
run; git keeps the old ones) and appends one line per run to ``results/history/<name>.jsonl``:
the date, the commit and a few headline numbers, so a drift shows without opening old files.
Numbers taken on a busy machine are only comparable with each other: the machine record has
the load average at the start and at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
HISTORY = RESULTS / "history"
#: Where the HelloBench root filesystems and images are built once and kept.
CACHE = Path(os.environ.get("STARGZ_BENCH_CACHE", "/var/cache/stargz-bench"))


def log(*a: object) -> None:
    """Progress on stderr with a time stamp (stdout is for the summary)."""
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _mem_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None


def git_state() -> dict[str, Any]:
    """The checkout measured: its commit and the uncommitted changes under src/."""
    git = ["git", "-C", str(REPO)]
    try:
        commit = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "src"], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty_src": []}
    return {"commit": commit or None, "dirty_src": dirty}


def machine(**extra: Any) -> dict[str, Any]:
    """CPU, cores, memory, kernel, Python, 1/5/15-minute load and git commit, plus
    ``extra`` (tool versions a benchmark depends on)."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "mem_bytes": _mem_bytes(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "git": git_state(),
        **extra,
    }


def tool_version(argv: Sequence[str]) -> str:
    """First line a ``--version`` command prints ('' if it is missing)."""
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return (p.stdout or p.stderr).strip().splitlines()[0] if (p.stdout or p.stderr) else ""


# ---------------------------------------------------------------- statistics


def percentile(xs: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``xs``, linearly interpolated between ranks."""
    s = sorted(xs)
    if not s:
        raise ValueError("percentile of no samples")
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def p99(xs: Iterable[float]) -> float:
    return percentile(xs, 99)


def summary(xs: Iterable[float], ndigits: int | None = None) -> dict[str, float]:
    """n, median, p95, p99, min and max of ``xs`` (rounded to ``ndigits`` if given)."""
    s = sorted(xs)
    out = {
        "median": statistics.median(s),
        "p95": percentile(s, 95),
        "p99": percentile(s, 99),
        "min": s[0],
        "max": s[-1],
    }
    if ndigits is not None:
        out = {k: round(v, ndigits) for k, v in out.items()}
    return {"n": len(s), **out}


# ---------------------------------------------------------------- per-process usage


def proc_usage(pid: int) -> dict[str, float]:
    """CPU seconds (user+sys, incl. waited-for children), RSS and peak RSS of a process,
    and its anonymous/file RSS ({} if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        out: dict[str, float] = {
            "cpu_s": sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
        }
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k == "VmRSS":
                    out["rss_bytes"] = int(v.split()[0]) * 1024
                elif k in ("RssAnon", "RssFile", "VmHWM"):
                    out[k] = int(v.split()[0]) * 1024
        return out
    except OSError:
        return {}


# ---------------------------------------------------------------- result files


def add_output_args(ap: argparse.ArgumentParser, name: str) -> None:
    """``--name`` (the result's name under results/) and ``--out`` (a scratch file instead:
    no history line), the same in every benchmark."""
    ap.add_argument(
        "--name",
        default=name,
        help=f"write results/NAME.json and add a line to results/history/NAME.jsonl "
        f"(default {name}; give another name for an A/B or a partial run)",
    )
    ap.add_argument(
        "--out", default="", help="write the JSON to this file instead (no history line)"
    )


def checkpoint(args: argparse.Namespace, data: dict[str, Any]) -> Path:
    """Save a run in progress (long benchmarks save after every trial): to ``--out``, or to
    ``results/<name>.partial.json`` so an unfinished run never replaces the latest result."""
    path = Path(args.out) if args.out else RESULTS / f"{args.name}.partial.json"
    _write_json(path, data)
    return path


def save(args: argparse.Namespace, data: dict[str, Any], headline: dict[str, Any]) -> Path:
    """The finished run: :func:`write_result` under ``--name``, or ``--out`` alone."""
    if args.out:
        _finish(data)
        _write_json(Path(args.out), data)
        return Path(args.out)
    return write_result(args.name, data, headline)


def write_result(name: str, data: dict[str, Any], headline: dict[str, Any]) -> Path:
    """Write ``results/<name>.json`` and append ``{date, commit, load, argv, headline}`` to
    ``results/history/<name>.jsonl``. ``headline`` holds the few numbers a reader compares
    across runs (the ones benchmarks/README.md quotes); ``argv`` says how it was run."""
    _finish(data)
    path = RESULTS / f"{name}.json"
    _write_json(path, data)
    (RESULTS / f"{name}.partial.json").unlink(missing_ok=True)
    HISTORY.mkdir(parents=True, exist_ok=True)
    line = {
        "date": data.get("date") or now_utc(),
        "commit": (data.get("machine", {}).get("git") or {}).get("commit"),
        "loadavg_1m": data["machine"]["loadavg_at_end"][0],
        "argv": sys.argv[1:],
        "headline": headline,
    }
    with open(HISTORY / f"{name}.jsonl", "a") as f:
        f.write(json.dumps(line, sort_keys=False) + "\n")
    return path


def _finish(data: dict[str, Any]) -> None:
    data.setdefault("date", now_utc())
    m = data.setdefault("machine", machine())
    m["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
