"""The FUSE holder process (`stargz.fuse.holder`), for real, without root: any descriptor
can be held, so a pipe stands in for ``/dev/fuse`` (the FUSE side is covered by
tests/fs/test_handover.py). What matters here: the holder keeps the *same open file*
(not a copy of its contents), hands out duplicates while keeping its own, replaces it on
PUT, exits on DROP, and keeps its directory and socket private."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from stargz.fuse.handover import FD_NAME, HolderHandover, SystemdHandover, choose
from stargz.fuse.holder import HolderClient


@pytest.fixture
def client(tmp_path: Path):
    c = HolderClient(str(tmp_path / "holder"))
    yield c
    pid = c.pid()
    if pid is not None:  # a test that failed half-way
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_holds_the_same_open_file_and_hands_out_duplicates(client: HolderClient):
    pid = client.spawn()
    assert client.spawn() == pid  # one holder per directory
    assert stat.S_IMODE(os.stat(client.dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(client.socket_path).st_mode) == 0o600
    assert client.get() is None  # nothing kept yet
    r, w = os.pipe()
    client.put(w, b'{"proto_minor": 41}')
    os.close(w)  # the holder's duplicate keeps the pipe's write end open
    for _ in range(2):  # a GET does not take it away
        got = client.get()
        assert got is not None
        fd, state = got
        assert state == b'{"proto_minor": 41}'
        os.write(fd, b"x")
        os.close(fd)
        assert os.read(r, 1) == b"x"
    # PUT replaces (the old one is closed: the pipe sees EOF once nobody else has it)
    r2, w2 = os.pipe()
    client.put(w2, b"second")
    os.close(w2)
    assert os.read(r, 1) == b""
    got = client.get()
    assert got is not None and got[1] == b"second"
    os.close(got[0])
    client.drop()
    assert client.pid() is None
    assert os.read(r2, 1) == b""  # dropped: closed
    assert client.get() is None  # no holder: nothing, not an error
    os.close(r)
    os.close(r2)


def test_a_signal_to_the_daemons_group_does_not_stop_it(client: HolderClient):
    pid = client.spawn()
    assert os.getsid(pid) == pid  # its own session
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        os.kill(pid, sig)
    time.sleep(0.2)
    assert client.alive()
    client.drop()
    assert client.pid() is None


def test_a_stale_socket_is_replaced(client: HolderClient):
    pid = client.spawn()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while client.alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    assert not client.alive()
    new = client.spawn()
    assert new != pid and client.alive()
    client.drop()


def test_choose_picks_the_keeper(tmp_path: Path):
    root = str(tmp_path)
    assert isinstance(choose(root, {}), HolderHandover)
    # under systemd: its store when the unit has one, nothing without (a holder would be
    # killed with the unit's cgroup)
    assert isinstance(choose(root, {"NOTIFY_SOCKET": "/x", "FDSTORE": "1"}), SystemdHandover)
    assert choose(root, {"NOTIFY_SOCKET": "/x"}) is None
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": FD_NAME}
    assert isinstance(choose(root, env), SystemdHandover)
