"""The format is a leaf (STYLE item 2): ``stargz.estargz`` imports no FUSE, gRPC, HTTP or
asyncio code, and none of the project's higher layers. So is the FUSE protocol library
(STYLE item 13): ``stargz.fuse`` imports the standard library only.

Each module is imported alone in a fresh interpreter, so what another test imported
earlier cannot hide (or cause) a violation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

FORBIDDEN = ("pyfuse3", "trio", "grpc", "aiohttp", "asyncio", "uvloop", "google.protobuf")
# stargz.* packages the format may use; anything else (fs, snapshot, service...) is higher up
ALLOWED_OWN = ("stargz", "stargz.errors", "stargz.estargz")

MODULES = [
    "stargz.estargz",
    "stargz.estargz.toc",
    "stargz.estargz.footer",
    "stargz.estargz.reader",
    "stargz.estargz.writer",
    "stargz.estargz.codec",
    "stargz.estargz.tocindex",
]

_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(sys.modules)))
"""


def _imported(module: str, **env: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, module],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, f"importing {module} failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


def _violations(mods: list[str]) -> list[str]:
    def under(m: str, pkgs) -> bool:
        return any(m == p or m.startswith(p + ".") for p in pkgs)

    bad = [m for m in mods if under(m, FORBIDDEN)]
    bad += [m for m in mods if under(m, ["stargz"]) and m not in ALLOWED_OWN[:1]]
    return [m for m in bad if not under(m, ALLOWED_OWN[1:])]


@pytest.mark.parametrize("no_ext", ["0", "1"], ids=["native", "pure"])
@pytest.mark.parametrize("module", MODULES)
def test_format_is_a_leaf(module, no_ext):
    mods = _imported(module, STARGZ_NO_EXTENSIONS=no_ext)
    assert module in mods
    assert _violations(mods) == [], f"{module} pulls in {_violations(mods)}"


def test_probe_detects_a_violation():
    """The check itself works: asyncio, and stargz layers above the format, are seen."""
    assert "asyncio" in _violations(_imported("asyncio"))
    assert _violations(["stargz", "stargz.errors", "stargz.estargz.reader"]) == []
    assert _violations(["stargz.snapshot", "grpc._cython", "stargz.estargz"]) == [
        "grpc._cython",
        "stargz.snapshot",
    ]


FUSE_MODULES = [
    "stargz.fuse",
    "stargz.fuse.protocol",
    "stargz.fuse.connection",
    "stargz.fuse.operations",
    "stargz.fuse.session",
    "stargz.fuse.stepping",
]
#: Third-party packages the FUSE library must not pull in (asyncio is its loop: allowed).
FUSE_FORBIDDEN = ("pyfuse3", "trio", "grpc", "aiohttp", "uvloop", "google.protobuf", "zstandard")


def _fuse_violations(mods: list[str]) -> list[str]:
    def under(m: str, pkgs) -> bool:
        return any(m == p or m.startswith(p + ".") for p in pkgs)

    bad = [m for m in mods if under(m, FUSE_FORBIDDEN)]
    bad += [m for m in mods if under(m, ["stargz"]) and m != "stargz"]
    return [m for m in bad if not under(m, ["stargz.fuse"])]


@pytest.mark.parametrize("module", FUSE_MODULES)
def test_fuse_is_a_leaf(module):
    mods = _imported(module)
    assert module in mods
    assert _fuse_violations(mods) == [], f"{module} pulls in {_fuse_violations(mods)}"


def test_fuse_probe_detects_a_violation():
    assert _fuse_violations(["stargz", "stargz.fuse.session", "asyncio"]) == []
    assert _fuse_violations(["stargz.fuse", "stargz.fs.ops", "stargz.errors", "uvloop"]) == [
        "uvloop",
        "stargz.fs.ops",
        "stargz.errors",
    ]
    # and importing the filesystem does pull in more than the leaf
    assert "stargz.fs.ops" in _fuse_violations(_imported("stargz.fs.ops"))


# --- every layer, statically --------------------------------------------------------------
#: What each part of ``stargz`` may import of the others (DESIGN "dependencies point one way"):
#: ``estargz`` <- ``remote`` <- ``fs``; ``fuse`` is a leaf the filesystem builds on;
#: ``snapshot`` owns containerd's semantics and knows only its own ``FileSystem`` protocol;
#: ``service`` wires a snapshotter to a filesystem and to gRPC; ``cli`` sits on top.
#: Top-level modules (``errors``, ``config``, ``private``, ``mountinfo``, ``unixsock``) are
#: shared leaves.
#: ``proto`` is the generated gRPC code under ``stargz.service.proto`` (a leaf: protobuf and
#: grpc only); ``containerd`` is the client of containerd's API (``stargz rpull``), which
#: fetches with ``remote`` and never touches the daemon's parts; ``service`` runs that
#: client for ``stargz.v1.Pull`` (the daemon making the pull ``stargz rpull`` asks for).
LAYER_RULES: dict[str, set[str]] = {
    "errors": set(),
    "private": set(),
    "mountinfo": set(),
    "unixsock": {"errors"},
    "config": {"errors"},
    "fuse": set(),
    "estargz": {"errors"},
    "remote": {"errors", "estargz", "config"},
    "image": {"errors", "estargz", "remote", "private"},
    "fs": {"errors", "estargz", "remote", "fuse", "private", "config", "mountinfo"},
    "snapshot": {"errors", "private", "mountinfo"},
    "proto": set(),
    "containerd": {"errors", "remote", "proto", "unixsock"},
    "optimize": {"errors", "estargz", "image", "fs", "mountinfo"},
    "service": {
        "errors", "config", "snapshot", "fs", "remote", "estargz", "fuse", "private", "proto",
        "containerd",
    },
    "cli": {
        "errors", "config", "estargz", "remote", "image", "fs", "fuse", "snapshot", "service",
        "private", "mountinfo", "optimize", "proto", "containerd", "unixsock",
    },
}  # fmt: skip


def _part(module: str) -> str:
    parts = module.split(".")
    if parts[1:3] == ["service", "proto"]:
        return "proto"
    return parts[1] if len(parts) > 1 else ""


def layer_violations(graph) -> list[str]:
    out = []
    for mod, edges in sorted(graph.items()):
        part = _part(mod)
        if not part:
            continue
        allowed = LAYER_RULES.get(part)
        if allowed is None:
            out.append(f"{mod}: no layer rule for stargz.{part} (add it to LAYER_RULES)")
            continue
        for dep, line in sorted(edges.items()):
            other = _part(dep)
            if other and other != part and other not in allowed:
                out.append(f"{mod} (line {line}) imports {dep}: {part} may not use {other}")
    return out


def test_every_layer_imports_only_what_it_may():
    from harness.imports import SRC, import_graph

    graph = import_graph(SRC)
    assert {"stargz.fs.filesystem", "stargz.snapshot.snapshotter", "stargz.cli.daemon"} <= set(
        graph
    )
    bad = layer_violations(graph)
    assert not bad, "wrong-way imports:\n  " + "\n  ".join(bad)


def test_layer_check_sees_a_wrong_way_import():
    graph = {
        "stargz.snapshot.snapshotter": {"stargz.fs.filesystem": 12, "stargz.errors": 3},
        "stargz.remote.client": {"stargz.estargz.footer": 1},
        "stargz.fuse.session": {"stargz.errors": 4},
        "stargz.newpart.x": {},
    }
    assert layer_violations(graph) == [
        "stargz.fuse.session (line 4) imports stargz.errors: fuse may not use errors",
        "stargz.newpart.x: no layer rule for stargz.newpart (add it to LAYER_RULES)",
        "stargz.snapshot.snapshotter (line 12) imports stargz.fs.filesystem: "
        "snapshot may not use fs",
    ]


def test_generated_protos_are_a_part_of_their_own():
    graph = {
        "stargz.containerd.client": {"stargz.service.proto.containerd.types.mount_pb2": 3},
        "stargz.containerd.pull": {"stargz.service.server": 7},
    }
    assert layer_violations(graph) == [
        "stargz.containerd.pull (line 7) imports stargz.service.server: "
        "containerd may not use service"
    ]


def test_containerd_client_loads_no_daemon_part():
    """At run time: ``stargz rpull``'s package loads no FUSE, filesystem, snapshotter or
    daemon service (the generated protos under ``stargz.service.proto`` only)."""
    mods = _imported("stargz.containerd.pull")
    assert "stargz.containerd.client" in mods
    daemon = ("stargz.fs", "stargz.fuse", "stargz.snapshot", "stargz.cli", "stargz.image")
    bad = [m for m in mods if m.startswith(daemon)]
    bad += [
        m
        for m in mods
        if m.startswith("stargz.service.")
        and not m.startswith("stargz.service.proto")
        and m != "stargz.service"
    ]
    assert bad == []


def test_remote_pulls_in_no_fuse_grpc_or_higher_layer():
    """At run time too: importing the registry client loads no FUSE, gRPC or layer above it."""
    mods = _imported("stargz.remote.client") + _imported("stargz.remote.layer")
    higher = ("stargz.fs", "stargz.fuse", "stargz.snapshot", "stargz.service", "stargz.cli")
    bad = [
        m
        for m in mods
        if m.split(".")[0] in ("pyfuse3", "grpc", "trio")
        or m.startswith(("google.protobuf", *higher))
    ]
    assert bad == []
    assert "stargz.estargz" in mods and "aiohttp" in mods
