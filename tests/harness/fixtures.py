"""pytest fixtures over :mod:`harness.procs`.

- ``e2e_host`` (session): skips when not root (the only reason to skip); fails when a
  required program or ``/dev/fuse`` is missing.
- ``shared`` (session): the shared fixtures dir (fails, never skips, when absent).
- ``registry`` (session): one docker-registry for the whole run.
- ``stargz_daemon`` (function): our daemon on a fresh root, at debug log level.
- ``containerd`` (function): containerd 1.6 whose ``stargz`` proxy plugin is that daemon.
- ``logged_registry`` (function): a docker-registry of the test's own, with its access log
  on (``Registry.blob_requests``: what it served), which the test may stop.
- ``lazy_stack`` (function): ``lazy_stack(config_text, extra_args, env)`` starts our daemon
  with lazy pulling on (no ``--no-lazy``), that TOML config, those extra command-line
  arguments and environment variables, plus a containerd using it; returns
  ``(daemon, containerd)``. Both are stopped by PID at teardown.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
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
    # The snapshotter on its own: containerd unpacks every layer.
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


@pytest.fixture
def logged_registry(e2e_host: None) -> Iterator[Registry]:
    reg = Registry.start(access_log=True)
    try:
        yield reg
    finally:
        reg.close()


LazyStack = Callable[..., tuple[StargzDaemon, Containerd]]


@pytest.fixture
def lazy_stack(e2e_host: None) -> Iterator[LazyStack]:
    # Lazy pulling: our daemon mounts eStargz layers from the registry via FUSE.
    started: list[Daemon] = []

    def start(
        config_text: str = "",
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> tuple[StargzDaemon, Containerd]:
        sd = StargzDaemon.start(config_text=config_text, extra_args=extra_args, env=env)
        started.append(sd)
        c = Containerd.start(sd.address)
        started.append(c)
        return sd, c

    try:
        yield start
    finally:
        with contextlib.ExitStack() as stack:
            for d in started:  # containerd (pushed last) stops first
                stack.callback(_show_log, d)
                stack.callback(d.close)


@pytest.fixture(scope="module")
def snapshot_daemon() -> Iterator[StargzDaemon]:
    """One real daemon per test module with lazy pulling off (``--no-lazy``): the snapshot
    semantics and the gRPC service only. Tests keep apart by key prefix."""
    d = StargzDaemon.start(extra_args=["--no-lazy"])
    try:
        yield d
    finally:
        d.close()
