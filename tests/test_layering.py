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
