"""``stargz rpull`` refuses bad input with one line on stderr and exit status 1, before or
without containerd (the end-to-end cases are in tests/e2e/test_rpull.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from harness.procs import REPO

from stargz.cli import rpull
from stargz.containerd import client


def stargz(*args: str, stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stargz.cli.main", *args],
        capture_output=True,
        text=True,
        stdin=stdin,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
    )


def one_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 1, p
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stargz: error: "), p.stderr
    return lines[0]


def test_defaults_are_containerds():
    assert rpull.DEFAULT_ADDRESS == client.DEFAULT_ADDRESS == "/run/containerd/containerd.sock"
    assert rpull.DEFAULT_NAMESPACE == client.DEFAULT_NAMESPACE == "default"


def test_no_socket(tmp_path):
    sock = tmp_path / "containerd.sock"
    msg = one_line(stargz("rpull", "-a", str(sock), "127.0.0.1:5000/app:1"))
    assert msg == f"stargz: error: cannot reach containerd at {sock}: no such socket " + (
        "(is containerd running?)"
    )


def test_not_a_socket(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    assert one_line(stargz("rpull", "-a", str(path), "r/a:1")).endswith(": not a socket")


def test_stale_socket(tmp_path):
    """A socket file nobody listens on (what a containerd that died leaves behind)."""
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    msg = one_line(stargz("rpull", "-a", str(path), "r/a:1"))
    assert "nothing listens on it" in msg, msg


@pytest.mark.parametrize(
    ("args", "want"),
    [
        (["reg:5000/Upper:1"], "must be lowercase"),
        (["app:bad tag"], "invalid tag"),
        (["--platform", "linux", "r/a:1"], "want os/arch"),
        (["--user", ":pw", "r/a:1"], "empty user name"),
        (["--user", "alice", "r/a:1"], "no password"),
    ],
)
def test_bad_arguments(args, want, tmp_path):
    msg = one_line(stargz("rpull", "-a", str(tmp_path / "none.sock"), *args))
    assert want in msg, msg


def test_help_lists_the_flags():
    out = stargz("rpull", "--help").stdout
    for flag in ("--address", "--namespace", "--snapshotter", "--plain-http", "--user"):
        assert flag in out
    assert "--platform" in out and Path(client.DEFAULT_ADDRESS).name in out
