"""The benchmarks still import and parse their arguments, so they cannot rot unnoticed.

Benchmarks are run as ``python -m benchmarks.<script>`` from the repository root; these tests
do exactly that in subprocesses (so the test run's own ``sys.path`` and its copy of the
harness play no part). Measuring anything is left to the benchmarks themselves.
"""

from __future__ import annotations

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
