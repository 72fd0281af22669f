"""The FUSE library's tests need no root: they run here again as ``nobody``, with no
capabilities and ``/dev/fuse`` replaced by ``/dev/null``.

A private mount namespace makes that possible on a machine where the interpreter or the
checkout live under ``/root`` (mode 0700): ``/root`` is covered by a world-readable tmpfs
into which just those directories are bound again. Nothing leaks out of the namespace.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSIDE = "STARGZ_FUSE_UNPRIVILEGED"


def _under_root(paths: list[str]) -> list[str]:
    """The top-level directories under /root that ``paths`` need (deduplicated)."""
    out: list[str] = []
    for p in paths:
        parts = Path(p).parts
        if len(parts) > 2 and parts[1] == "root":
            top = str(Path("/root", parts[2]))
            if top not in out:
                out.append(top)
    return out


@pytest.mark.skipif(os.environ.get(INSIDE) == "1", reason="this is the unprivileged run itself")
def test_the_fuse_library_tests_pass_as_nobody_without_dev_fuse(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("already unprivileged: the rest of tests/fuse is this check")
    needed = [
        os.path.realpath(sys.executable),
        sys.prefix,
        sys.base_prefix,
        str(REPO),
        *(p for p in sys.path if p and os.path.isdir(p)),
    ]
    lines = ["set -e"]
    kept = _under_root(needed)
    if kept:
        for i, top in enumerate(kept):
            lines += [
                f"mkdir -p {tmp_path}/k{i}",
                f"mount --bind {shlex.quote(top)} {tmp_path}/k{i}",
            ]
        lines.append("mount -t tmpfs -o mode=755 tmpfs /root")
        for i, top in enumerate(kept):
            lines += [
                f"mkdir -p {shlex.quote(top)}",
                f"mount --bind {tmp_path}/k{i} {shlex.quote(top)}",
            ]
    lines.append("mount --bind /dev/null /dev/fuse")
    pytest_cmd = " ".join(
        shlex.quote(a)
        for a in [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/fuse"]
    )
    lines.append(
        "exec setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all "
        "--bounding-set=-all env HOME=/tmp PYTHONDONTWRITEBYTECODE=1 "
        # (no hypothesis example database: the checkout is not writable for nobody)
        f"STARGZ_HYPOTHESIS_PROFILE=ci {INSIDE}=1 {pytest_cmd}"
    )
    os.chmod(tmp_path, 0o755)
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(lines)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert " passed" in out and " failed" not in out, out[-2000:]
    # the run really was unprivileged and without the device
    assert "1 skipped" in out  # (this test, inside)
