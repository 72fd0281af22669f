"""What ``stargz rpull`` loads when the daemon makes the pull.

The command's start-up is mostly imports: the registry client (aiohttp and the TLS
contexts it builds), containerd's stubs, the config loader, the TOC reader. On the daemon
path the command only sends a request and prints events, so it must load grpc and the
generated ``stargz.v1.Pull`` code and none of those. The command runs with
``PYTHONPROFILEIMPORTTIME``, so its stderr lists every module it imported; a real pull
(our daemon, containerd, docker-registry) makes sure the whole path ran.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from harness.fixtures import containerd, registry, shared, stargz_daemon  # noqa: F401
from harness.procs import REPO

pytestmark = [pytest.mark.timeout(180)]

#: Never loaded on the daemon path: the registry client and its HTTP stack, containerd's
#: client, the config loader, the format and image code, the daemon's own parts, the
#: other commands. (asyncio and ssl are not listed: grpc itself imports them.)
NOT_ON_THE_DAEMON_PATH = (
    "aiohttp",
    "yarl",
    "multidict",
    "stargz.remote",
    "stargz.containerd",
    "stargz.config",
    "stargz.estargz",
    "stargz.image",
    "stargz.fs",
    "stargz.snapshot",
    "stargz.service.pull",
    "stargz.service.server",
    "stargz.service.proto.containerd",
    "stargz.cli.convert",
    "stargz.cli.doctor",
    "stargz.cli.daemon",
)
_IMPORT = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$")


def rpull_imports(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    p = subprocess.run(
        [sys.executable, "-m", "stargz.cli.main", "rpull", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHONPROFILEIMPORTTIME="1"),
    )
    mods = {m.group(1) for line in p.stderr.splitlines() if (m := _IMPORT.match(line))}
    return p, mods


def _under(mods: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in mods if any(m == n or m.startswith(n + ".") for n in names))


def test_the_daemon_path_loads_grpc_and_the_pull_stubs_only(
    stargz_daemon,  # noqa: F811
    containerd,  # noqa: F811
    registry,  # noqa: F811
    shared,  # noqa: F811
):
    ref = registry.push_oci(shared / "fixtures" / "oci-busybox", "1", "imports:1")
    common = ("-a", containerd.address, "-n", "imports", ref)
    p, mods = rpull_imports("--daemon-address", stargz_daemon.address, *common)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (
        [x for x in p.stdout.splitlines() if x.startswith("layer ")]
        == [x for x in p.stdout.splitlines() if x.startswith("layer 1: ") and "unpacked (" in x]
        != []
    ), p.stdout
    assert "pulling in this process" not in p.stderr
    # the probe sees the modules the daemon path does load
    assert {"grpc", "stargz.cli.rpull", "stargz.cli.daemon_pull"} <= mods
    assert "stargz.service.proto.stargz.v1.pull_pb2" in mods
    assert _under(mods, NOT_ON_THE_DAEMON_PATH) == []
    # and is not blind: the in-process pull of the same image loads the registry client
    p, mods = rpull_imports("--in-process", *common)
    assert p.returncode == 0, p.stderr[-3000:]
    assert {"aiohttp", "stargz.remote.client", "stargz.containerd.pull"} <= set(mods)
