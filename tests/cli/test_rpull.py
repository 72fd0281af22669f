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


def in_process(*args: str) -> subprocess.CompletedProcess:
    return stargz("rpull", "--in-process", *args)


def test_defaults_are_containerds():
    assert rpull.DEFAULT_ADDRESS == client.DEFAULT_ADDRESS == "/run/containerd/containerd.sock"
    assert rpull.DEFAULT_NAMESPACE == client.DEFAULT_NAMESPACE == "default"


def test_default_daemon_address_is_the_daemons():
    from stargz.cli import daemon

    assert rpull.DEFAULT_DAEMON_ADDRESS == daemon.DEFAULT_ADDRESS


def test_no_socket(tmp_path):
    sock = tmp_path / "containerd.sock"
    msg = one_line(in_process("-a", str(sock), "127.0.0.1:5000/app:1"))
    assert msg == f"stargz: error: cannot reach containerd at {sock}: no such socket " + (
        "(is containerd running?)"
    )


def test_not_a_socket(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    assert one_line(in_process("-a", str(path), "r/a:1")).endswith(": not a socket")


def test_stale_socket(tmp_path):
    """A socket file nobody listens on (what a containerd that died leaves behind)."""
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
    msg = one_line(in_process("-a", str(path), "r/a:1"))
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
    msg = one_line(in_process("-a", str(tmp_path / "none.sock"), *args))
    assert want in msg, msg


@pytest.mark.parametrize(
    ("args", "want"),
    [
        (["--user", ":pw", "r/a:1"], "empty user name"),
        (["--user", "alice", "r/a:1"], "no password"),
    ],
)
def test_bad_user_is_refused_before_asking_the_daemon(args, want, tmp_path):
    """Checked before any daemon is asked (or found missing): no fallback note."""
    p = stargz("rpull", "--daemon-address", str(tmp_path / "d.sock"), *args)
    assert want in one_line(p)


def test_without_a_daemon_the_pull_runs_here_and_says_so(tmp_path):
    """No daemon socket: a note on stderr, then the in-process pull (which here finds no
    containerd either, and says that in its one error line)."""
    daemon, cd = tmp_path / "daemon.sock", tmp_path / "containerd.sock"
    p = stargz("rpull", "--daemon-address", str(daemon), "-a", str(cd), "r/a:1")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p
    assert p.stderr.splitlines() == [
        f"stargz: cannot reach the stargz daemon at {daemon}: no such socket "
        "(is the stargz daemon running?); pulling in this process",
        f"stargz: error: cannot reach containerd at {cd}: no such socket (is containerd running?)",
    ], p.stderr
    quiet = stargz("rpull", "-q", "--daemon-address", str(daemon), "-a", str(cd), "r/a:1")
    assert one_line(quiet).startswith("stargz: error: cannot reach containerd")


def test_daemon_address_and_in_process_exclude_each_other():
    p = stargz("rpull", "--in-process", "--daemon-address", "/x.sock", "r/a:1")
    assert p.returncode == 2 and "not allowed with" in p.stderr, p


def test_help_lists_the_flags():
    out = stargz("rpull", "--help").stdout
    for flag in (
        "--address", "--namespace", "--snapshotter", "--plain-http", "--user",
        "--daemon-address", "--in-process",
    ):  # fmt: skip
        assert flag in out
    assert "--platform" in out and Path(client.DEFAULT_ADDRESS).name in out
