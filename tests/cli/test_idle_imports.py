"""What a started daemon has loaded before any layer is mounted.

Idle memory is mostly imported code: aiohttp and its helpers (~14 MB resident), the image
writer, prometheus-client (~1 MB, more with its deps) have no work to do until a lazy
layer is mounted or metrics are asked for. Modules, not RSS, are checked: RSS moves with
the machine, the set of modules does not. The daemon runs with ``PYTHONPROFILEIMPORTTIME``,
so its own log lists every module it imported.
"""

from __future__ import annotations

import re
import socket
import time

import pytest
from harness.procs import StargzDaemon

from stargz import mountinfo

#: Loaded only once there is work for them (a lazy mount, a metrics scrape, an image
#: conversion); numpy and friends never.
NOT_AT_IDLE = (
    "aiohttp",
    "yarl",
    "multidict",
    "stargz.remote.client",
    "stargz.remote.blob",
    "stargz.estargz.writer",
    "stargz.image",
    "prometheus_client",
    "numpy",
)
_IMPORT = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$")


def _imported(daemon: StargzDaemon) -> set[str]:
    return {m.group(1) for line in daemon.log_text().splitlines() if (m := _IMPORT.match(line))}


def _under(mods: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in mods if any(m == n or m.startswith(n + ".") for n in names))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def idle_daemon(monkeypatch, request):
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    d = StargzDaemon.start(config_text=getattr(request, "param", ""), log_level="info")
    try:
        time.sleep(0.5)  # serving (the harness waited for List); let start-up settle
        yield d
    finally:
        d.close()


NO_PRELOAD = "preload_registry_client = false\n"


@pytest.mark.parametrize("idle_daemon", [NO_PRELOAD], indirect=True)
def test_an_idle_daemon_loads_no_registry_client_writer_or_metrics(idle_daemon):
    mods = _imported(idle_daemon)
    # the probe sees what a serving daemon with a FUSE mount must have loaded
    assert {"grpc", "stargz.service.server", "stargz.fs.filesystem", "stargz.fuse"} <= mods
    fuse_dir = f"{idle_daemon.root}/fuse"
    assert fuse_dir in mountinfo.mount_points(), "the FUSE root is not mounted"
    assert _under(mods, NOT_AT_IDLE) == []


@pytest.mark.parametrize(
    "idle_daemon", [NO_PRELOAD + f'metrics_address = "127.0.0.1:{_free_port()}"'], indirect=True
)
def test_metrics_address_loads_prometheus_client(idle_daemon):
    """The probe is not blind: asking for metrics does load prometheus-client (and the
    aiohttp server it is served with)."""
    mods = _imported(idle_daemon)
    assert _under(mods, ("prometheus_client",)) != []
    assert _under(mods, ("stargz.estargz.writer", "stargz.image", "stargz.remote.client")) == []


def test_by_default_the_registry_client_is_preloaded_once_serving(idle_daemon):
    """The default imports the registry client in the background (the first lazy mount
    does not wait for it), and nothing else that has no work yet."""
    deadline = time.monotonic() + 20
    mods = _imported(idle_daemon)
    while "stargz.remote.client" not in mods and time.monotonic() < deadline:
        time.sleep(0.2)
        mods = _imported(idle_daemon)
    assert {"stargz.remote.client", "aiohttp"} <= mods
    assert _under(mods, ("stargz.estargz.writer", "stargz.image", "prometheus_client")) == []
