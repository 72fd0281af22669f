"""Fixtures for the registry client tests: a real docker-registry with images in it.

- ``registry`` (session): the CNCF distribution registry (Debian ``docker-registry``) on
  127.0.0.1:<free port>, storage in a temp dir, ready once ``GET /v2/`` answers, stopped
  by PID. A missing binary fails the run (CI installs it); it is never a skip.
- ``images`` (session): what the tests read, pushed once: ``corners:esgz`` from the
  shared fixture (skopeo), a 3 MiB random blob in ``blobs``, and an OCI index
  ``corners:multi`` whose linux/amd64 entry is ``corners:esgz``.
- ``run``: runs a coroutine function on a fresh loop, asyncio or uvloop
  (``run_both`` is parametrized over the two).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin

import pytest
import uvloop

T = TypeVar("T")

MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalRegistry:
    host: str  # "127.0.0.1:PORT"
    workdir: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def log(self) -> str:
        try:
            return (self.workdir / "registry.log").read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    # -- plain HTTP uploads (the distribution API, no client of ours involved) --

    def _call(self, method: str, url: str, data: bytes | None = None, headers=None):
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        status, headers, _ = self._call("POST", f"{self.url}/v2/{repo}/blobs/uploads/", b"")
        assert status == 202, status
        loc = urljoin(f"{self.url}/", headers["Location"])
        sep = "&" if "?" in loc else "?"
        status, _, _ = self._call(
            "PUT",
            f"{loc}{sep}digest={digest}",
            data,
            {"Content-Type": "application/octet-stream"},
        )
        assert status == 201, status
        return digest

    def push_manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> str:
        status, headers, _ = self._call(
            "PUT", f"{self.url}/v2/{repo}/manifests/{ref}", body, {"Content-Type": media_type}
        )
        assert status == 201, status
        return headers["Docker-Content-Digest"]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    if not os.path.exists(binary):
        pytest.fail("docker-registry is not installed (apt-get install docker-registry)")
    workdir = tmp_path_factory.mktemp("registry")
    port = free_port()
    host = f"127.0.0.1:{port}"
    (workdir / "storage").mkdir()
    cfg = workdir / "config.yml"
    cfg.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'storage'}\n"
        f"http:\n  addr: {host}\n"
    )
    with open(workdir / "registry.log", "wb") as logf:
        proc = subprocess.Popen(
            [binary, "serve", str(cfg)],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    reg = LocalRegistry(host, workdir, proc)
    try:
        deadline = time.monotonic() + 30
        while not _answers(f"{reg.url}/v2/"):
            if proc.poll() is not None:
                pytest.fail(f"docker-registry exited ({proc.returncode}):\n{reg.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"docker-registry not answering after 30 s:\n{reg.log()}")
            time.sleep(0.02)
        yield reg
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)


@dataclass
class Images:
    registry: LocalRegistry
    esgz_ref: str  # "127.0.0.1:PORT/corners:esgz"
    esgz_manifest: dict[str, Any]
    esgz_manifest_digest: str
    multi_ref: str  # an OCI index: linux/arm64 -> a tiny image, linux/amd64 -> esgz
    multi_digest: str
    docker_list_ref: str  # a Docker manifest list: linux/amd64 -> a Docker v2 manifest
    docker_manifest_digest: str
    blob_ref: str  # "127.0.0.1:PORT/blobs"
    blob: bytes
    blob_digest: str
    layout: Path  # the copied oci-corners layout

    def layer_path(self, digest: str) -> Path:
        return self.layout / "blobs" / "sha256" / digest.split(":", 1)[1]


@pytest.fixture(scope="session")
def images(registry: LocalRegistry, fixtures_dir: Path, tmp_path_factory) -> Images:
    if shutil.which("skopeo") is None:
        pytest.fail("skopeo is not installed (apt-get install skopeo)")
    layout = tmp_path_factory.mktemp("layout") / "oci-corners"
    shutil.copytree(fixtures_dir / "oci-corners", layout)
    for p in [layout, *layout.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            f"oci:{layout}:esgz",
            f"docker://{registry.host}/corners:esgz",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    index = json.loads((layout / "index.json").read_text())
    desc = next(
        d
        for d in index["manifests"]
        if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == "esgz"
    )
    raw = (layout / "blobs" / "sha256" / desc["digest"].split(":", 1)[1]).read_bytes()

    # a tiny second image for another platform, and an index over both
    config = json.dumps({"architecture": "arm64", "os": "linux", "rootfs": {}}).encode()
    config_digest = registry.push_blob("corners", config)
    tiny = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": {"mediaType": MT_OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [],
        }
    ).encode()
    tiny_digest = registry.push_manifest("corners", "tiny", tiny, MT_OCI_MANIFEST)
    index_body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MT_OCI_INDEX,
            "manifests": [
                {
                    "mediaType": MT_OCI_MANIFEST,
                    "digest": tiny_digest,
                    "size": len(tiny),
                    "platform": {"architecture": "arm64", "os": "linux"},
                },
                {
                    "mediaType": MT_OCI_MANIFEST,
                    "digest": desc["digest"],
                    "size": desc["size"],
                    "platform": {"architecture": "amd64", "os": "linux"},
                },
            ],
        }
    ).encode()
    multi_digest = registry.push_manifest("corners", "multi", index_body, MT_OCI_INDEX)

    # the same in Docker's schema 2 media types
    docker_manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MT_DOCKER_MANIFEST,
            "config": {
                "mediaType": MT_DOCKER_CONFIG,
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [],
        }
    ).encode()
    docker_manifest_digest = registry.push_manifest(
        "corners", "docker-tiny", docker_manifest, MT_DOCKER_MANIFEST
    )
    docker_list = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MT_DOCKER_LIST,
            "manifests": [
                {
                    "mediaType": MT_DOCKER_MANIFEST,
                    "digest": docker_manifest_digest,
                    "size": len(docker_manifest),
                    "platform": {"architecture": "amd64", "os": "linux"},
                }
            ],
        }
    ).encode()
    registry.push_manifest("corners", "docker-list", docker_list, MT_DOCKER_LIST)

    blob = random.Random(1234).randbytes(3 << 20)
    blob_digest = registry.push_blob("blobs", blob)
    return Images(
        registry=registry,
        esgz_ref=f"{registry.host}/corners:esgz",
        esgz_manifest=json.loads(raw),
        esgz_manifest_digest=desc["digest"],
        multi_ref=f"{registry.host}/corners:multi",
        multi_digest=multi_digest,
        docker_list_ref=f"{registry.host}/corners:docker-list",
        docker_manifest_digest=docker_manifest_digest,
        blob_ref=f"{registry.host}/blobs",
        blob=blob,
        blob_digest=blob_digest,
        layout=layout,
    )


def _runner(kind: str) -> asyncio.Runner:
    return asyncio.Runner(loop_factory=uvloop.new_event_loop if kind == "uvloop" else None)


Runner = Callable[[Callable[[], Coroutine[Any, Any, T]]], T]


@pytest.fixture
def run() -> Runner:
    """``run(async_fn)``: call it on a fresh asyncio loop and return its result."""

    def go(fn):
        with _runner("asyncio") as r:
            return r.run(fn())

    return go


@pytest.fixture(params=["asyncio", "uvloop"])
def run_both(request) -> Runner:
    """Like ``run``, once on asyncio's loop and once on uvloop."""

    def go(fn):
        with _runner(request.param) as r:
            return r.run(fn())

    return go


@pytest.fixture
def docker_config(tmp_path, monkeypatch) -> Callable[[dict], Path]:
    """Write ``$DOCKER_CONFIG/config.json`` in a temp dir (and point the env at it)."""
    d = tmp_path / "docker"
    d.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(d))

    def write(config: dict) -> Path:
        (d / "config.json").write_text(json.dumps(config))
        return d / "config.json"

    write({})
    return write
