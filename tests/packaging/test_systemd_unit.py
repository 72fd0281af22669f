"""The shipped systemd unit (``packaging/containerd-stargz-grpc.service``) starts the daemon
the package installs, with the daemon's default paths, and its promises hold: the daemon
run with the unit's flags under a notify socket (as systemd runs it) stores its FUSE
connection in the descriptor store and says READY=1 once serving (``Type=notify``); the
unit's stop signal stops it cleanly within the unit's stop timeout.
"""

from __future__ import annotations

import array
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from harness.procs import REPO, make_tempdir, unmount_under

from stargz import config
from stargz.cli import daemon

UNIT = REPO / "packaging" / "containerd-stargz-grpc.service"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's unit syntax: [Section], Key=Value (a key may repeat), # and ; comments,
    a trailing backslash continues the line."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = out.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not Key=Value: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section][key]
    assert len(values) == 1, f"{section}.{key} set {len(values)} times"
    return values[0]


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def exec_start(unit) -> list[str]:
    return shlex.split(one(unit, "Service", "ExecStart"))


def test_exec_start_is_the_installed_entry_point_with_the_daemons_defaults(unit):
    argv = exec_start(unit)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    program = Path(argv[0])
    assert program.is_absolute()  # systemd wants an absolute path
    assert scripts[program.name] == "stargz.cli.daemon:main"
    # the daemon's own parser reads the flags: they exist, and every path is its default
    args = daemon._parser().parse_args(argv[1:])
    assert args.config == config.DEFAULT_CONFIG_PATH
    assert args.address == daemon.DEFAULT_ADDRESS
    assert args.root == daemon.DEFAULT_ROOT
    assert args.fuse_handover == "systemd"
    assert not args.no_lazy


def test_service_settings_match_the_daemons_design(unit):
    assert one(unit, "Unit", "Before") == "containerd.service"
    assert "network-online.target" in one(unit, "Unit", "After").split()
    service = unit["Service"]
    assert one(unit, "Service", "Type") == "notify"  # the daemon sends READY=1 (test below)
    assert one(unit, "Service", "Restart") == "always"
    assert one(unit, "Service", "RestartSec") == "1"
    # the FUSE descriptor is kept in the store; nothing in the cgroup must outlive a stop
    assert int(one(unit, "Service", "FileDescriptorStoreMax")) >= 1
    assert one(unit, "Service", "KillMode") == "control-group"
    assert one(unit, "Service", "KillSignal") == "SIGTERM"  # SIGINT would unmount
    # the stop timeout leaves room for the daemon's grace period for in-flight calls
    assert int(one(unit, "Service", "TimeoutStopSec")) > daemon.SHUTDOWN_GRACE_SEC
    assert "NotifyAccess" not in service  # READY=1 comes from the main process itself
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_systemd_analyze_accepts_the_unit(tmp_path):
    """``systemd-analyze verify`` on the unit, its ExecStart pointed at the entry point this
    checkout installed (verify wants an existing program): no warnings at all."""
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze missing (ci/setup.sh installs systemd)"
    installed = shutil.which("containerd-stargz-grpc")
    assert installed, "the containerd-stargz-grpc entry point is not on PATH"
    text = UNIT.read_text().replace(exec_start(parse_unit(UNIT.read_text()))[0], installed)
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    p = subprocess.run([tool, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    ours = [line for line in (p.stdout + p.stderr).splitlines() if UNIT.name in line]
    assert ours == [], "\n".join(ours)


def _recv(rx: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    msg, anc, _flags, _addr = rx.recvmsg(4096, socket.CMSG_SPACE(16 * fds.itemsize))
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return msg, list(fds)


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_daemon_under_the_units_flags_keeps_fuse_in_the_store_and_notifies(unit, e2e_host):
    """As systemd 252 runs it: $NOTIFY_SOCKET set, no $FDSTORE. The unit's flags (paths
    moved to a temp dir) must still put the FUSE descriptor in the store, then READY=1."""
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        pytest.fail("/dev/fuse is not usable")
    work = make_tempdir("sgz-unit-")
    notify = work / "notify.sock"
    address, root = work / "run" / "s.sock", work / "root"
    argv = [sys.executable, "-m", "stargz.cli.daemon", *exec_start(unit)[1:]]
    # (argparse: the last of a repeated flag wins)
    argv += ["--address", str(address), "--root", str(root), "--config", "/dev/null"]
    env = {k: v for k, v in os.environ.items() if k not in ("FDSTORE", "LISTEN_FDS", "LISTEN_PID")}
    env.update(PYTHONPATH=str(REPO / "src"), NOTIFY_SOCKET=str(notify))
    stored: list[int] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(str(notify))
        rx.settimeout(30)
        log = open(work / "daemon.log", "wb")  # (closed below)
        p = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            messages = []
            while b"READY=1" not in messages:
                msg, fds = _recv(rx)
                messages.append(msg)
                stored += fds
            logged = (work / "daemon.log").read_text()
            assert messages[0] == b"FDSTORE=1\nFDNAME=stargz-fuse", (messages, logged)
            assert len(stored) == 1
            assert os.readlink(f"/proc/self/fd/{stored[0]}") == "/dev/fuse"
            assert address.is_socket()

            stop = int(one(unit, "Service", "TimeoutStopSec"))
            start = time.monotonic()
            p.send_signal(getattr(signal, one(unit, "Service", "KillSignal")))
            assert _recv(rx)[0] == b"STOPPING=1"
            assert p.wait(stop) == 0
            assert time.monotonic() - start < stop
            # SIGTERM leaves the mount to the next start: the stored connection is still up
            from stargz.fuse import handover

            assert handover.connected(stored[0])
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
            for fd in stored:
                os.close(fd)  # (the store's copy was the last: the connection ends)
            unmount_under(work)
            shutil.rmtree(work, ignore_errors=True)
