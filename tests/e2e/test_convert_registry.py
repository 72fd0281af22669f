"""``stargz convert`` registry to registry, against a real docker-registry.

The converted layers are checked with the Go reference reader (``esgz-verify``) and the
converted image is lazily pulled through our daemon by Go's ``ctr-remote i rpull`` into a
real containerd: its merged tree must equal the fixture's ground truth. What went over
the wire is read from the registry's own access log.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from harness import Registry, free_port, mounted_image, run, tree_listing
from harness.oci import find_manifest, two_platform_layout
from harness.procs import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.interop, pytest.mark.timeout(300)]

NS = "convert"
TOC = "containerd.io/snapshot/stargz/toc.digest"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
ACCEPT = f"{OCI_INDEX}, {OCI_MANIFEST}"


def stargz(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The ``stargz`` CLI as a user runs it (stderr is a pipe: no progress bars)."""
    return subprocess.run(
        [sys.executable, "-m", "stargz.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})},
    )


def ok(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    p = stargz(*args, env=env)
    assert p.returncode == 0, p.stderr
    return p


def get(reg: Registry, path: str, accept: str = ACCEPT) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://{reg.host}/v2/{path}", headers={"Accept": accept})
    if reg.basic_auth:
        token = base64.b64encode(":".join(reg.basic_auth).encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def manifest(reg: Registry, repo: str, obj: str) -> dict[str, Any]:
    status, body = get(reg, f"{repo}/manifests/{obj}")
    assert status == 200, (repo, obj, status, body[:300])
    return json.loads(body)


def tag_absent(reg: Registry, repo: str, tag: str) -> bool:
    return get(reg, f"{repo}/manifests/{tag}")[0] == 404


def blob(reg: Registry, repo: str, digest: str) -> bytes:
    status, body = get(reg, f"{repo}/blobs/{digest}", accept="*/*")
    assert status == 200, (repo, digest, status)
    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
    return body


def go_verifies(reg: Registry, repo: str, man: dict[str, Any], esgz_verify: Path, tmp: Path):
    """Every layer of ``man`` opens and verifies with the Go reference reader."""
    assert man["mediaType"] == OCI_MANIFEST
    for layer in man["layers"]:
        path = tmp / layer["digest"].split(":")[1]
        path.write_bytes(blob(reg, repo, layer["digest"]))
        p = subprocess.run(
            [str(esgz_verify), str(path), layer["annotations"][TOC]],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 0, (layer["digest"], p.stderr[-2000:])


def ground_truth(shared: Path) -> dict[str, Any]:
    return json.loads((shared / "fixtures" / "oci-corners.merged-tree.json").read_text())


def blob_writes(reg: Registry, since: int = 0) -> list[str]:
    """PUT/POST/PATCH requests on blobs after the first ``since`` requests."""
    return [
        f"{r.method} {r.path}"
        for r in reg.requests()[since:]
        if r.method in ("PUT", "POST", "PATCH") and "/blobs/" in r.path
    ]


# --- convert, verify with Go, lazily pull through our daemon -----------------------------


@pytest.mark.parametrize("flags", [(), ("--zstdchunked",)], ids=["estargz", "zstdchunked"])
def test_convert_registry_to_registry_then_go_reads_and_lazy_pull_matches(
    flags, logged_registry, lazy_stack, shared, esgz_verify, tmp_path
):
    reg = logged_registry
    src = reg.push_oci(shared / "fixtures" / "oci-corners", "orig", "corners:orig")
    dst = reg.ref("corners-conv:new")
    p = ok("convert", "-q", *flags, src, dst)
    man = manifest(reg, "corners-conv", "new")
    assert (
        p.stdout.strip()
        == "sha256:" + hashlib.sha256(get(reg, "corners-conv/manifests/new")[1]).hexdigest()
    )
    want_type = "tar+zstd" if flags else "tar+gzip"
    assert [x["mediaType"] for x in man["layers"]] == [
        f"application/vnd.oci.image.layer.v1.{want_type}"
    ] * 2
    go_verifies(reg, "corners-conv", man, esgz_verify, tmp_path)

    # get-toc-digest and inspect read the layers from the registry
    for i, layer in enumerate(man["layers"]):
        got = ok("get-toc-digest", dst, "--layer", str(i)).stdout.strip()
        assert got == layer["annotations"][TOC]
    out = ok("inspect", dst, "--layer", man["layers"][1]["digest"], "--json").stdout
    info = json.loads(out)
    assert info["toc_digest"] == man["layers"][1]["annotations"][TOC]
    assert info["format"] == ("zstd:chunked" if flags else "estargz")

    sd, c = lazy_stack("no_background_fetch = true\n")
    run(["ctr-remote", "-a", c.address, "-n", NS, "images", "rpull", "--plain-http", dst])
    flags_seen = [
        r["remote-snapshot-prepared"] for r in sd.log_records() if "remote-snapshot-prepared" in r
    ]
    assert flags_seen == ["true", "true"], sd.log_text()[-3000:]
    with mounted_image(c, dst, NS) as root:
        assert tree_listing(root) == ground_truth(shared)


# --- indexes and platforms ------------------------------------------------------------------


def test_an_index_is_converted_whole_and_platform_picks_one(
    logged_registry, shared, esgz_verify, tmp_path
):
    reg = logged_registry
    layout = two_platform_layout(shared / "fixtures" / "oci-busybox", "1", tmp_path / "multi")
    src = reg.push_oci(layout, "multi", "bb:multi", all_platforms=True)
    ok("convert", "-q", src, reg.ref("bb-conv:all"))
    idx = manifest(reg, "bb-conv", "all")
    assert idx["mediaType"] == OCI_INDEX
    assert [m["platform"]["architecture"] for m in idx["manifests"]] == ["amd64", "arm64"]
    layers = set()
    for m in idx["manifests"]:
        man = manifest(reg, "bb-conv", m["digest"])
        go_verifies(reg, "bb-conv", man, esgz_verify, tmp_path)
        cfg = json.loads(blob(reg, "bb-conv", man["config"]["digest"]))
        assert cfg["architecture"] == m["platform"]["architecture"]
        layers |= {x["digest"] for x in man["layers"]}
    assert len(layers) == 1  # the shared layer was converted once

    ok("convert", "-q", "--platform", "linux/arm64", src, reg.ref("bb-conv:arm"))
    idx = manifest(reg, "bb-conv", "arm")
    assert [m["platform"]["architecture"] for m in idx["manifests"]] == ["arm64"]

    p = stargz("convert", "-q", "--platform", "linux/s390x", src, reg.ref("bb-conv:s390x"))
    assert p.returncode == 1
    assert p.stderr.splitlines() == [p.stderr.strip()]
    assert "no manifest for platform linux/s390x" in p.stderr and "amd64" in p.stderr
    assert tag_absent(reg, "bb-conv", "s390x")


# --- what goes over the wire ----------------------------------------------------------------


def test_rerun_uploads_no_blob(logged_registry, shared):
    reg = logged_registry
    src = reg.push_oci(shared / "fixtures" / "oci-corners", "orig", "corners:orig")
    ok("convert", "-q", src, reg.ref("again:esgz"))
    before = len(reg.requests())
    assert blob_writes(reg)  # the first run did upload
    ok("convert", "-q", src, reg.ref("again:esgz"))
    after = reg.requests()[before:]
    assert blob_writes(reg, before) == []
    heads = [r for r in after if r.method == "HEAD" and r.path.startswith("/v2/again/blobs/")]
    assert len(heads) == 3  # two layers and the config, each found
    assert all(r.status == 200 for r in heads)


def test_same_registry_other_repo_mounts_instead_of_uploading(logged_registry, shared):
    """Go's eStargz layers are kept as they are; into another repository of the same
    registry they are mounted, never sent."""
    reg = logged_registry
    src = reg.push_oci(shared / "fixtures" / "oci-corners", "esgz", "corners:esgz")
    layers = [
        x["digest"] for x in find_manifest(shared / "fixtures" / "oci-corners", "esgz")["layers"]
    ]  # type: ignore[index]
    before = len(reg.requests())
    ok("convert", "-q", src, reg.ref("mounted:esgz"))
    writes = blob_writes(reg, before)
    for d in layers:
        mounts = [w for w in writes if f"mount={d}" in w.replace("%3A", ":")]
        assert len(mounts) == 1 and "from=corners" in mounts[0], writes
        assert not [w for w in writes if w.startswith("PUT") and d in w.replace("%3A", ":")]
    assert [x["digest"] for x in manifest(reg, "mounted", "esgz")["layers"]] == layers


# --- bad input: one line, exit 1, no destination tag ---------------------------------------


def one_line_failure(p: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith("stargz: error: "), p.stderr
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in p.stderr, p.stderr


def test_unreachable_registry(logged_registry):
    p = stargz("convert", "-q", f"127.0.0.1:{free_port()}/x:y", logged_registry.ref("u:t"))
    one_line_failure(p, "x")
    assert tag_absent(logged_registry, "u", "t")


def test_401_without_credentials_then_with_docker_config(shared, tmp_path, e2e_host):
    reg = Registry.start(access_log=True, basic_auth=("alice", "s3cret"))
    try:
        src = reg.push_oci(shared / "fixtures" / "oci-busybox", "1", "bb:1")
        empty = tmp_path / "empty"
        empty.mkdir()
        p = stargz("convert", "-q", src, reg.ref("bb:esgz"), env={"DOCKER_CONFIG": str(empty)})
        one_line_failure(p, "401")
        assert tag_absent(reg, "bb", "esgz")
        cfg = tmp_path / "docker"
        cfg.mkdir()
        auth = base64.b64encode(b"alice:s3cret").decode()
        (cfg / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
        ok("convert", "-q", src, reg.ref("bb:esgz"), env={"DOCKER_CONFIG": str(cfg)})
        assert manifest(reg, "bb", "esgz")["layers"][0]["annotations"][TOC]
    finally:
        reg.close()


def test_a_manifest_that_is_not_an_image(logged_registry):
    reg = logged_registry

    def push_blob(data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        post = urllib.request.Request(f"http://{reg.host}/v2/art/blobs/uploads/", method="POST")
        with urllib.request.urlopen(post, timeout=10) as r:
            location = urllib.parse.urljoin(f"http://{reg.host}/", r.headers["Location"])
        put = urllib.request.Request(
            f"{location}&digest={digest}",
            data=data,
            method="PUT",
            headers={"Content-Type": "application/octet-stream"},
        )
        with urllib.request.urlopen(put, timeout=10) as r:
            assert r.status == 201
        return {"digest": digest, "size": len(data)}

    cfg = push_blob(b"{}")
    data = push_blob(b"not a layer")
    man = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.example.config.v1+json", **cfg},
        "layers": [{"mediaType": "application/vnd.example.data", **data}],
    }
    req = urllib.request.Request(
        f"http://{reg.host}/v2/art/manifests/v1",
        data=json.dumps(man).encode(),
        method="PUT",
        headers={"Content-Type": OCI_MANIFEST},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 201
    p = stargz("convert", "-q", reg.ref("art:v1"), reg.ref("art:esgz"))
    one_line_failure(p, "not a container image", "application/vnd.example.config.v1+json")
    assert tag_absent(reg, "art", "esgz")


def test_a_corrupted_source_blob_fails_and_leaves_no_tag(logged_registry, shared):
    reg = logged_registry
    src = reg.push_oci(shared / "fixtures" / "oci-corners", "orig", "corners:orig")
    big = max(
        find_manifest(shared / "fixtures" / "oci-corners", "orig")["layers"],
        key=lambda d: d["size"],
    )  # type: ignore[index]
    path = reg.blob_file(big["digest"])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    p = stargz("convert", "-q", src, reg.ref("corrupt:esgz"))
    one_line_failure(p, big["digest"])
    assert tag_absent(reg, "corrupt", "esgz")
    # and a source blob that is gone
    path.unlink()
    p = stargz("convert", "-q", src, reg.ref("corrupt:esgz"))
    one_line_failure(p, big["digest"])
    assert tag_absent(reg, "corrupt", "esgz")


# --- progress on stderr ---------------------------------------------------------------------


def test_progress_is_one_line_per_layer_step_and_quiet_is_silent(logged_registry, shared):
    reg = logged_registry
    src = reg.push_oci(shared / "fixtures" / "oci-corners", "orig", "corners:orig")
    p = ok("convert", src, reg.ref("prog:esgz"))
    lines = p.stderr.strip().splitlines()
    steps = [tuple(line.split()[1:3]) for line in lines if line.startswith("layer ")]
    layers = find_manifest(shared / "fixtures" / "oci-corners", "orig")["layers"]  # type: ignore[index]
    for d in layers:
        short = d["digest"][:19]
        assert sorted(s for lay, s in steps if lay == short) == ["convert", "download", "upload"]
    assert len(steps) == 6 and len(lines) == 7 and lines[-1].startswith("converted 2 layer(s)")
    q = ok("convert", "-q", src, reg.ref("prog:esgz2"))
    assert q.stderr == ""
    assert q.stdout.strip().startswith("sha256:")


# --- Docker media types, bearer tokens, terminals ---------------------------------------------


def test_docker_media_types_become_oci(logged_registry, shared, esgz_verify, tmp_path):
    """A Docker manifest list of Docker schema 2 manifests comes out as an OCI index of OCI
    manifests, configs and layers."""
    reg = logged_registry
    layout = two_platform_layout(shared / "fixtures" / "oci-busybox", "1", tmp_path / "multi")
    src = reg.push_oci(layout, "multi", "dk:multi", all_platforms=True, docker_format=True)
    status, body = get(reg, "dk/manifests/multi", accept=DOCKER_LIST)
    assert status == 200 and json.loads(body)["mediaType"] == DOCKER_LIST
    ok("convert", "-q", src, reg.ref("dk:esgz"))
    idx = manifest(reg, "dk", "esgz")
    assert idx["mediaType"] == OCI_INDEX and len(idx["manifests"]) == 2
    for m in idx["manifests"]:
        assert m["mediaType"] == OCI_MANIFEST
        man = manifest(reg, "dk", m["digest"])
        assert man["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
        go_verifies(reg, "dk", man, esgz_verify, tmp_path)


def test_bearer_token_covers_push_and_mount_scopes(logged_registry, shared):
    """Behind a bearer-token gate (a proxy in front of the real registry): the converter
    gets tokens for pull+push on the destination, and for the mount also pull on the
    source repository, and the image lands."""
    from harness.faults import BearerAuth, ProxyThread

    reg = logged_registry
    reg.push_oci(shared / "fixtures" / "oci-corners", "esgz", "corners:esgz")
    auth = BearerAuth(user="bob", password="pw")
    with ProxyThread() as pt:
        proxy = pt.start(f"http://{reg.host}", auth)
        cfg = tmp_docker_config({proxy.netloc: ("bob", "pw")})
        try:
            ok(
                "convert",
                "-q",
                f"{proxy.netloc}/corners:esgz",
                f"{proxy.netloc}/tok:esgz",
                env={"DOCKER_CONFIG": str(cfg)},
            )
        finally:
            shutil.rmtree(cfg, ignore_errors=True)
        scopes = [set(r["scope"]) for r in auth.token_requests]
        assert any({"repository:tok:pull,push", "repository:corners:pull"} <= s for s in scopes), (
            scopes
        )
        assert all(r["auth"] for r in auth.token_requests)  # basic credentials for every token
        mounts = [s for s in proxy.requests("POST") if "mount" in s.query]
        assert len(mounts) == 2 and all(s.query["from"] == "corners" for s in mounts)
        assert not proxy.requests("PUT", r"/blobs/uploads/.+")  # nothing was uploaded
    assert manifest(reg, "tok", "esgz")["layers"] == manifest(reg, "corners", "esgz")["layers"]


def tmp_docker_config(creds: dict[str, tuple[str, str]]) -> Path:
    from harness import make_tempdir

    d = make_tempdir("sgz-dcfg-")
    auths = {
        host: {"auth": base64.b64encode(f"{u}:{p}".encode()).decode()}
        for host, (u, p) in creds.items()
    }
    (d / "config.json").write_text(json.dumps({"auths": auths}))
    return d


def test_a_terminal_gets_one_progress_bar_per_layer(logged_registry, shared):
    """On a terminal (a pty with a size), stderr carries tqdm bars: per layer, its
    download, convert and upload steps with bytes and rate."""
    import fcntl
    import pty
    import struct
    import termios

    reg = logged_registry
    src = reg.push_oci(shared / "fixtures" / "oci-corners", "orig", "corners:orig")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "stargz.cli.main", "convert", src, reg.ref("tty:esgz")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    os.close(slave)
    out = bytearray()
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            out.extend(data)
    finally:
        os.close(master)
        code = proc.wait(120)
    assert code == 0, out.decode(errors="replace")[-3000:]
    text = out.decode(errors="replace")
    for d in find_manifest(shared / "fixtures" / "oci-corners", "orig")["layers"]:  # type: ignore[index]
        short = d["digest"][:19]
        for step in ("download", "convert", "upload"):
            assert f"{short} {step:8}" in text, (short, step, text[-2000:])
    assert "100%|" in text and "B/s" in text  # bars with a percentage and a rate
    assert manifest(reg, "tty", "esgz")["layers"][0]["annotations"][TOC]
