"""``stargz optimize`` registry to registry, no layout dir in sight: a real docker-registry,
the workload run by real runc on our FUSE mounts + overlayfs, the result read back from
the registry's own storage, checked by Go's ``esgz-verify``, then lazily pulled through our
daemon by Go's ``ctr-remote i rpull`` and run again: with background fetch off, the
registry's access log shows no fetch beyond the prefetch range.

Ground truth: the files the workload reads are known (it names them); the optimized layer
must hold exactly the source layer's files (our reader vs the fixture's tar); the record's
manifest digest is the registry's; what was downloaded is in the registry's access log.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import Registry, free_port
from harness.oci import two_platform_layout
from harness.procs import REPO

from stargz.estargz import open_file
from stargz.estargz.toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK

from .test_convert_registry import (
    get,
    manifest,
    one_line_failure,
    tag_absent,
)
from .test_lazy import (
    NO_BACKGROUND,
    TAIL,
    assert_lazily_mounted,
    assert_quiet_log,
    busybox_expected_output,
    ctr_run,
    rpull,
)

pytestmark = [pytest.mark.e2e, pytest.mark.interop, pytest.mark.timeout(300)]

TOC = "containerd.io/snapshot/stargz/toc.digest"
WORKLOAD = "cat /etc/greeting; ls /bin"
FLAGS = ("--entrypoint", '["/bin/sh","-c"]', "--args", json.dumps([WORKLOAD]))
CONFIG = NO_BACKGROUND + "[fuse]\npassthrough = false\n"


def stargz(*args: str, tmp: Path, env: dict[str, str] | None = None):
    """The CLI of this checkout; its temp files go to ``tmp`` (checked empty after)."""
    tmp.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "stargz.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), "TMPDIR": str(tmp), **(env or {})},
    )


def prefetch_list(blob: Path) -> list[str] | None:
    """Regular files before ``.prefetch.landmark`` (None: ``.no.prefetch.landmark``)."""
    with open_file(str(blob)) as r:
        entries = [(e.name, e.type) for e in r.toc.entries]
    names = [n for n, _ in entries]
    if NO_PREFETCH_LANDMARK in names:
        return None
    assert PREFETCH_LANDMARK in names, names
    return [n for n, t in entries[: names.index(PREFETCH_LANDMARK)] if t == "reg"]


def full_gets(reg: Registry, digest: str, size: int) -> int:
    """GETs of the whole blob ``digest`` the registry answered."""
    return sum(1 for r in reg.blob_requests(digest) if r.method == "GET" and r.size == size)


@pytest.fixture
def busybox(logged_registry: Registry, shared: Path) -> str:
    return logged_registry.push_oci(shared / "fixtures" / "oci-busybox", "1", "busybox:1")


def test_registry_to_registry_then_lazy_pull_fetches_only_the_prefetch_range(
    logged_registry, busybox, lazy_stack, shared, esgz_verify, trees, tmp_path
):
    reg = logged_registry
    dst = reg.ref("busybox:opt")
    (src_layer,) = manifest(reg, "busybox", "1")["layers"]
    src_digest = "sha256:" + hashlib.sha256(get(reg, "busybox/manifests/1")[1]).hexdigest()
    rec = tmp_path / "record.json"
    tmp = tmp_path / "tmp"
    p = stargz("optimize", "--plain-http", *FLAGS, "--record-out", str(rec), busybox, dst, tmp=tmp)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("hi\n")  # the workload ran
    assert list(tmp.iterdir()) == []  # the scratch dir (downloads, sandbox) is gone
    # the source layer came down once: the final conversion read the scratch copy
    assert full_gets(reg, src_layer["digest"], src_layer["size"]) == 1
    assert f"layer {src_layer['digest'][:19]} download" in p.stderr

    man = manifest(reg, "busybox", "opt")
    raw = get(reg, "busybox/manifests/opt")[1]
    assert p.stdout.strip().splitlines()[-1] == "sha256:" + hashlib.sha256(raw).hexdigest()
    (layer,) = man["layers"]
    blob = reg.blob_file(layer["digest"])
    print("prefetch list:", prefetch_list(blob))
    assert prefetch_list(blob) == ["bin/busybox", "etc/greeting"]
    with open_file(str(blob)) as r:
        names = [e.name for e in r.toc.entries]
    assert names[: names.index(PREFETCH_LANDMARK) + 1] == [
        "",
        "bin",
        "bin/busybox",
        "etc",
        "etc/greeting",
        PREFETCH_LANDMARK,
    ]
    assert [json.loads(x) for x in rec.read_text().splitlines()] == [
        {"path": "bin/busybox", "manifestDigest": src_digest, "layerIndex": 0},
        {"path": "etc/greeting", "manifestDigest": src_digest, "layerIndex": 0},
    ]
    # the registry ref reads back: TOC digest, Go's reader, every file of the source
    got = stargz("get-toc-digest", dst, tmp=tmp)
    assert got.returncode == 0 and got.stdout.strip() == layer["annotations"][TOC], got.stderr
    v = subprocess.run(
        [str(esgz_verify), str(blob), layer["annotations"][TOC]], capture_output=True, text=True
    )
    assert v.returncode == 0, v.stderr
    src_tar = shared / "fixtures" / "oci-busybox" / "blobs" / "sha256"
    with open_file(str(blob), toc_digest=layer["annotations"][TOC]) as r:
        trees.compare(trees.reader(r), trees.tar(src_tar / src_layer["digest"].split(":")[1]))
    with open_file(str(blob)) as r:
        prefetch = r.prefetch_size or 0
    assert prefetch > 0

    sd, c = lazy_stack(CONFIG)
    before = len(reg.blob_requests(layer["digest"]))
    rpull(c, dst)
    assert_lazily_mounted(sd, c, man["layers"])
    out = ctr_run(c, dst, "optimized", "sh", "-c", WORKLOAD)
    assert out == busybox_expected_output(shared)
    gets = [r.size for r in reg.blob_requests(layer["digest"])[before:] if r.method == "GET"]
    print("GET sizes", gets, "prefetch", prefetch, "blob", layer["size"])
    # opening the layer: the probe and at most one more GET for the footer + TOC; then the
    # prefetch range, once; an on-demand read would be one more GET. 1 byte: reachability
    rest = [n for n in gets if n != 1]
    assert prefetch in rest, gets
    rest.remove(prefetch)
    assert len(rest) <= 2 and sum(rest) <= TAIL, gets
    assert_quiet_log(sd)


def test_platform_picks_the_manifest_of_an_index(logged_registry, shared, tmp_path):
    """An index of linux/amd64 and linux/arm64 (same layers, the arm64 config says so):
    the host's by default, ``--platform`` the other; the output is that one manifest.
    A platform the index lacks is a one-line error and no tag."""
    reg = logged_registry
    layout = two_platform_layout(shared / "fixtures" / "oci-busybox", "1", tmp_path / "multi")
    src = reg.push_oci(layout, "multi", "multi:1", all_platforms=True)
    index = manifest(reg, "multi", "1")
    by_arch = {m["platform"]["architecture"]: m["digest"] for m in index["manifests"]}
    tmp = tmp_path / "tmp"
    for flags, arch in (((), "amd64"), (("--platform", "linux/arm64"), "arm64")):
        rec = tmp_path / f"{arch}.json"
        p = stargz(
            "optimize",
            "-q",
            *flags,
            *FLAGS,
            "--record-out",
            str(rec),
            src,
            reg.ref(f"multi:{arch}"),
            tmp=tmp,
        )
        assert p.returncode == 0, p.stderr
        man = manifest(reg, "multi", arch)
        assert man["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
        cfg = json.loads(get(reg, f"multi/blobs/{man['config']['digest']}", accept="*/*")[1])
        assert cfg["architecture"] == arch
        entries = [json.loads(x) for x in rec.read_text().splitlines()]
        assert {e["manifestDigest"] for e in entries} == {by_arch[arch]}
        assert prefetch_list(reg.blob_file(man["layers"][0]["digest"])) == [
            "bin/busybox",
            "etc/greeting",
        ]
    assert list(tmp.iterdir()) == []
    p = stargz(
        "optimize", "--platform", "linux/s390x", *FLAGS, src, reg.ref("multi:s390x"), tmp=tmp
    )
    one_line_failure(p, "no manifest for platform linux/s390x", "amd64")
    assert tag_absent(reg, "multi", "s390x")


def test_from_trace_reads_a_registry_image_once(logged_registry, busybox, tmp_path):
    """``--from-trace`` with a registry source and destination: the layer is downloaded
    once (by the conversion), and the trace's files come first."""
    reg = logged_registry
    (src_layer,) = manifest(reg, "busybox", "1")["layers"]
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        "".join(
            json.dumps({"path": p, "layerDigest": src_layer["digest"], "ref": busybox}) + "\n"
            for p in ("etc/greeting", "bin/busybox")
        )
    )
    tmp = tmp_path / "tmp"
    p = stargz(
        "optimize", "-q", "--from-trace", str(trace), busybox, reg.ref("busybox:ft"), tmp=tmp
    )
    assert p.returncode == 0, p.stderr
    assert list(tmp.iterdir()) == []
    assert full_gets(reg, src_layer["digest"], src_layer["size"]) == 1
    (layer,) = manifest(reg, "busybox", "ft")["layers"]
    assert prefetch_list(reg.blob_file(layer["digest"])) == ["etc/greeting", "bin/busybox"]


@pytest.mark.parametrize("from_trace", [False, True], ids=["workload", "from-trace"])
def test_bad_sources_are_one_line_errors_and_leave_no_tag(
    logged_registry, busybox, shared, tmp_path, from_trace
):
    reg = logged_registry
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps({"path": "etc/greeting", "layerDigest": "x", "ref": "y"}) + "\n")
    mode = ("--from-trace", str(trace)) if from_trace else FLAGS
    tmp = tmp_path / "tmp"
    dst = reg.ref("busybox:bad")

    unreachable = stargz("optimize", *mode, f"127.0.0.1:{free_port()}/x:y", dst, tmp=tmp)
    one_line_failure(unreachable, "x")
    unknown = stargz("optimize", *mode, reg.ref("busybox:nope"), dst, tmp=tmp)
    one_line_failure(unknown, "nope")
    assert tag_absent(reg, "busybox", "bad")

    private = Registry.start(access_log=True, basic_auth=("alice", "s3cret"))
    try:
        src = private.push_oci(shared / "fixtures" / "oci-busybox", "1", "bb:1")
        empty = tmp_path / "docker"
        empty.mkdir()
        p = stargz(
            "optimize",
            *mode,
            src,
            private.ref("bb:bad"),
            tmp=tmp,
            env={"DOCKER_CONFIG": str(empty)},
        )
        one_line_failure(p, "401")
        assert tag_absent(private, "bb", "bad")
    finally:
        private.close()
    assert list(tmp.iterdir()) == []


def test_layout_and_registry_either_way_round(logged_registry, busybox, shared, tmp_path):
    """An OCI layout source into a registry tag, an eStargz registry image into another
    tag, and a registry source into a layout given without a tag (it gets the source's
    tag): the same prioritized files."""
    reg = logged_registry
    tmp = tmp_path / "tmp"
    layout = shared / "fixtures" / "oci-busybox"
    p = stargz("optimize", "-q", *FLAGS, f"oci:{layout}:1", reg.ref("busybox:from-layout"), tmp=tmp)
    assert p.returncode == 0, p.stderr
    (layer,) = manifest(reg, "busybox", "from-layout")["layers"]
    assert prefetch_list(reg.blob_file(layer["digest"])) == ["bin/busybox", "etc/greeting"]

    # a source layer that already is eStargz is mounted as it was pulled
    esgz = reg.push_oci(layout, "esgz", "busybox:esgz")
    p = stargz("optimize", "-q", *FLAGS, esgz, reg.ref("busybox:esgz-opt"), tmp=tmp)
    assert p.returncode == 0, p.stderr
    (layer,) = manifest(reg, "busybox", "esgz-opt")["layers"]
    assert prefetch_list(reg.blob_file(layer["digest"])) == ["bin/busybox", "etc/greeting"]

    out = tmp_path / "out"
    p = stargz("optimize", "-q", *FLAGS, busybox, f"oci:{out}", tmp=tmp)
    assert p.returncode == 0, p.stderr
    (entry,) = json.loads((out / "index.json").read_text())["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "1"
    man = json.loads((out / "blobs" / "sha256" / entry["digest"].split(":")[1]).read_text())
    (layer,) = man["layers"]
    assert prefetch_list(out / "blobs" / "sha256" / layer["digest"].split(":")[1]) == [
        "bin/busybox",
        "etc/greeting",
    ]
    assert list(tmp.iterdir()) == []


def test_a_failing_workload_setup_after_the_pull_leaves_no_tag_and_no_scratch(
    logged_registry, busybox, tmp_path
):
    reg = logged_registry
    tmp = tmp_path / "tmp"
    p = stargz(
        "optimize", "--entrypoint", '["/no/such/program"]', busybox, reg.ref("busybox:x"), tmp=tmp
    )
    assert p.returncode == 1, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("stargz: error: ") and "/no/such/program" in last, p.stderr
    assert "Traceback" not in p.stderr
    assert tag_absent(reg, "busybox", "x")
    assert list(tmp.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_during_the_download_removes_the_scratch_dir(
    logged_registry, busybox, tmp_path, sig
):
    """The layer's GET stalls (a proxy in front of the real registry); Ctrl-C or SIGTERM
    while it does: exit status 130, no traceback, nothing left under $TMPDIR, no tag."""
    from harness.faults import ProxyThread, Stall

    reg = logged_registry
    (layer,) = manifest(reg, "busybox", "1")["layers"]
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with ProxyThread() as pt:
        proxy = pt.start(f"http://{reg.host}", Stall(1, 120, path_re=layer["digest"]))
        src = f"{proxy.netloc}/busybox:1"
        proc = subprocess.Popen(
            [sys.executable, "-m", "stargz.cli.main", "optimize", *FLAGS, src, reg.ref("bb:int")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO / "src"), "TMPDIR": str(tmp)},
        )
        try:
            deadline = time.monotonic() + 60
            while not proxy.requests("GET", layer["digest"]):
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the layer was never asked for"
                time.sleep(0.1)
            assert [p.name for p in tmp.iterdir()][0].startswith("stargz-optimize-")
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert list(tmp.iterdir()) == []
    assert tag_absent(reg, "bb", "int")
