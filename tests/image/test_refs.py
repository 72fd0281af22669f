"""`stargz.image.refs`: which image argument is a layout and which a registry reference,
and the CLI on plain directory paths (layout to layout, no registry)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stargz.errors import InvalidArgument, InvalidReference
from stargz.image.refs import LayoutLocation, RegistryLocation, parse_location

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "text, host, repo, tag, digest",
    [
        ("127.0.0.1:5000/app:1", "127.0.0.1:5000", "app", "1", None),
        ("localhost/a/b", "localhost", "a/b", "latest", None),
        ("reg.example/app@sha256:" + "a" * 64, "reg.example", "app", None, "sha256:" + "a" * 64),
        ("docker://ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None),
    ],
)
def test_registry_references(text, host, repo, tag, digest):
    loc = parse_location(text)
    assert isinstance(loc, RegistryLocation)
    assert (loc.ref.host, loc.ref.repository, loc.ref.tag, loc.ref.digest) == (
        host,
        repo,
        tag,
        digest,
    )


def test_layouts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "img.d").mkdir()
    assert parse_location("oci:/x/y:t") == LayoutLocation("/x/y", "t")
    assert parse_location("oci:/x/y") == LayoutLocation("/x/y", None)
    assert parse_location("ubuntu:22.04") == LayoutLocation("ubuntu", "22.04")
    assert parse_location("./out:esgz") == LayoutLocation("./out", "esgz")
    # an existing directory wins over a registry-looking name
    assert parse_location("img.d/../img.d:v") == LayoutLocation("img.d/../img.d", "v")
    assert parse_location(str(tmp_path)) == LayoutLocation(str(tmp_path), None)


def test_bad_locations():
    with pytest.raises(InvalidArgument, match="unknown transport 'http'"):
        parse_location("http://127.0.0.1:5000/app:1")
    with pytest.raises(InvalidReference):
        parse_location("127.0.0.1:5000/App:1")


def test_cli_converts_plain_directories_and_quiet_is_silent(tmp_path, corners):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    argv = [sys.executable, "-m", "stargz.cli.main", "convert"]
    p = subprocess.run(
        [*argv, "-q", f"{corners.root}:orig", f"{out}:esgz"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    index = json.loads((out / "index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["digest"] == p.stdout.strip()
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "esgz"
    # a layout with one image needs no tag; the destination takes the source's tag
    p = subprocess.run(
        [*argv, str(out), str(tmp_path / "again")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert [line.split()[2] for line in lines[:-1]] == ["reuse", "upload"] * 2, lines
    again = json.loads((tmp_path / "again" / "index.json").read_text())
    assert again["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "esgz"
    # --no-reuse converts an eStargz layer all the same
    p = subprocess.run(
        [*argv, "--no-reuse", str(out), f"{tmp_path / 'forced'}:x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert [line.split()[2] for line in p.stderr.splitlines()[:-1]].count("convert") == 2
