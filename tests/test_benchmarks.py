"""The benchmarks still import and parse their arguments, so they cannot rot unnoticed.

Benchmarks are run as ``python -m benchmarks.<script>`` from the repository root; these tests
do exactly that in subprocesses (so the test run's own ``sys.path`` and its copy of the
harness play no part). Measuring anything is left to the benchmarks themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
#: Every script a person runs: the bench_*.py files and the HelloBench chart.
SCRIPTS = sorted(f"benchmarks.{p.stem}" for p in BENCH.glob("bench_*.py")) + [
    "benchmarks.hellobench.chart"
]
#: Every module of the package, helpers included.
MODULES = sorted(
    ".".join(p.relative_to(REPO).with_suffix("").parts)
    for p in BENCH.rglob("*.py")
    if p.name != "__init__.py"
)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_scripts_found() -> None:
    assert len(SCRIPTS) >= 15, SCRIPTS
    assert "benchmarks.common" in MODULES


def test_every_module_imports() -> None:
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    p = _run("-c", code, *MODULES)
    assert p.returncode == 0, p.stderr


def test_every_script_answers_help() -> None:
    """``--help`` of each script, in parallel (each is a fresh interpreter)."""
    with ThreadPoolExecutor(4) as pool:
        done = dict(zip(SCRIPTS, pool.map(lambda m: _run("-m", m, "--help"), SCRIPTS), strict=True))
    failed = {m: p.stderr[-2000:] for m, p in done.items() if p.returncode != 0}
    assert not failed, failed
    for m, p in done.items():
        assert p.stdout.startswith("usage:"), (m, p.stdout[:200])


@pytest.mark.parametrize("path", sorted(BENCH.rglob("*.py")), ids=lambda p: p.name)
def test_no_sys_path_edits(path: Path) -> None:
    """Scripts import the installed package and each other's modules normally."""
    assert "sys.path" not in path.read_text()


SPLIT_CHECK = """
import json, os, sys
from benchmarks.hellobench.images import _split, _walk
root = sys.argv[1]
entries = _walk(root)
layers = _split(entries, 4)
files = sorted(a for p, a, d in entries if not d)
seen = sorted(a for layer in layers for p, a, d in layer if not d)
missing_parents = [
    a for layer in layers for p, a, d in layer
    if os.path.dirname(a) and os.path.dirname(a) not in {x for _, x, dd in layer if dd}
]
print(json.dumps({"n": len(layers), "same": files == seen, "missing": missing_parents,
                  "empty": [i for i, g in enumerate(layers) if not any(not d for *_, d in g)]}))
"""


def test_hellobench_split_layers(tmp_path: Path) -> None:
    """The many-layer HelloBench image: every file in exactly one layer, each layer with
    the directories above what it holds, no layer without files."""
    for i in range(8):
        d = tmp_path / f"d{i}" / "sub"
        d.mkdir(parents=True)
        (d / "f").write_bytes(b"x" * (1000 * (i + 1)))
        (tmp_path / f"d{i}" / "g").write_bytes(b"y" * 10)
    os.symlink("d0/g", tmp_path / "link")
    p = _run("-c", SPLIT_CHECK, str(tmp_path))
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got == {"n": 4, "same": True, "missing": [], "empty": []}


LIMIT_CHECK = """
import json
from benchmarks.bench_hellobench import limits
need = {"manifest_bytes": 1000, "config_bytes": 1000, "toc_footer_bytes": 48000,
        "prefetch_bytes": 4950000}
t = lambda x: {"median": x}
doc = {
    "networks": [{"name": "n", "one_way_delay_ms": 10.0, "rate": "200mbit"}],
    "images": {"python": {"need": {"ours-all-opt": need}}},
    "summary": {
        "n/python/legacy": {"create_s": t(0.1), "run_s": t(0.3)},
        "n/python/ours-all-opt": {"total_s": t(1.0), "fetched_bytes": t(6000000)},
    },
}
print(json.dumps(limits(doc)["n/python"]))
"""


def test_hellobench_limit() -> None:
    """5 MB at 200 Mbit/s (0.2 s) + 5 round trips of 20 ms + 0.4 s local start = 0.7 s."""
    p = _run("-c", LIMIT_CHECK)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert abs(got["limit_s"] - 0.7) < 1e-9, got
    assert abs(got["ours-all-opt/limit"] - 1.0 / 0.7) < 1e-9, got
    assert abs(got["limit_fetched_s"] - (0.24 + 0.1 + 0.4)) < 1e-9, got
