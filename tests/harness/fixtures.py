"""pytest fixtures over :mod:`harness.procs`.

- ``e2e_host`` (session): skips when not root (the only reason to skip); fails when a
  required program or ``/dev/fuse`` is missing.
- ``shared`` (session): the shared fixtures dir (fails, never skips, when absent).
- ``registry`` (session): one docker-registry for the whole run.
- ``stargz_daemon`` (function): our daemon on a fresh root, at debug log level.
- ``containerd`` (function): containerd 1.6 whose ``stargz`` proxy plugin is that daemon.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .procs import Containerd, Daemon, Registry, StargzDaemon, shared_dir

REQUIRED_PROGRAMS = ("containerd", "ctr", "runc", "docker-registry", "skopeo", "umount")


@pytest.fixture(scope="session")
def e2e_host() -> None:
    if os.geteuid() != 0:
        pytest.skip("end-to-end tests need root (containerd, runc and overlay mounts)")
    missing = [p for p in REQUIRED_PROGRAMS if shutil.which(p) is None]
    if missing:
        pytest.fail(f"programs missing for end-to-end tests: {', '.join(missing)}")
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing (modprobe fuse)")


@pytest.fixture(scope="session")
def shared() -> Path:
    return shared_dir()


@pytest.fixture(scope="session")
def registry(e2e_host: None) -> Iterator[Registry]:
    reg = Registry.start()
    try:
        yield reg
    finally:
        reg.close()


def _show_log(d: Daemon, lines: int = 60) -> None:
    # Printed at teardown: pytest shows it only when the test failed.
    tail = d.log_text().splitlines()[-lines:]
    print(f"----- last {len(tail)} lines of the {d.name} log -----", *tail, sep="\n")


@pytest.fixture
def stargz_daemon(e2e_host: None) -> Iterator[StargzDaemon]:
    # The snapshotter on its own (issue 3): containerd unpacks every layer.
    d = StargzDaemon.start(extra_args=["--no-lazy"])
    try:
        yield d
    finally:
        d.close()
        _show_log(d)


@pytest.fixture
def containerd(stargz_daemon: StargzDaemon) -> Iterator[Containerd]:
    c = Containerd.start(stargz_daemon.address)
    try:
        yield c
    finally:
        c.close()
        _show_log(c, 30)
