"""Neighbour layers end to end: the first remote Prepare of an image starts resolving its
other layers and fetching their TOCs (from the ``stargz.layers`` label Go's
``ctr-remote i rpull`` sets), and their own Prepares reuse what was fetched.

A 12-layer image made by our converter (our eStargz writer) is pushed to a real
docker-registry whose access log records every blob request, and lazily pulled by a real
containerd 1.6 driven by Go's ``ctr-remote i rpull``. Prefetch and background fetch are
off, so the only blob requests are the ones that open each layer (its footer and TOC):
with the feature on or off, each layer's TOC is fetched exactly once.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness import Containerd, Registry, StargzDaemon, mounted_image, run
from harness.load import merged_regular_files
from harness.oci import build_image, find_manifest
from harness.procs import make_tempdir, unmount_under

from stargz.estargz.footer import parse_footer
from stargz.remote.locate import TAIL_PROBE_SIZE
from stargz.service.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from stargz.snapshot.types import TARGET_SNAPSHOT_LABEL

pytestmark = [pytest.mark.e2e, pytest.mark.interop, pytest.mark.timeout(300)]

NS = "neighbours"
N_LAYERS = 12
TOC_LABEL = "containerd.io/snapshot/stargz/toc.digest"
MISSING = "sha256:" + "e" * 64
#: Only the opening of each layer reads its blob; more neighbour fetches at a time than
#: the image has layers, so every one of them starts at the first Prepare.
BASE_CONFIG = (
    "noprefetch = true\nno_background_fetch = true\nresolve_neighbours_parallel = 16\n"
    "[fuse]\npassthrough = false\n"
)


@dataclass
class Image:
    layout: Path
    #: The converted (eStargz) layer descriptors, base first.
    layers: list[dict[str, Any]]
    #: ``/path`` -> (sha256, size) of every regular file of the merged rootfs.
    files: dict[str, tuple[str, int]]
    diff_ids: list[str]

    def blob(self, digest: str) -> Path:
        return self.layout / "blobs" / "sha256" / digest.split(":")[1]


def _layer_files(i: int) -> dict[str, bytes]:
    # layer 3 has a TOC bigger than the resolve probe brings (a second request opens it);
    # layer 7 replaces a file of layer 0
    n = 900 if i == 3 else 20 + 5 * i
    files = {
        f"l{i:02d}/f{j:04d}": f"layer {i} file {j}\n".encode() * (j % 50 + 1) for j in range(n)
    }
    if i == 7:
        files["l00/f0001"] = b"replaced by layer 7\n"
    return files


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    from stargz.image.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("neighbours") / "layout"
    build_image(out, "orig", [_layer_files(i) for i in range(N_LAYERS)])
    desc, _ = convert(f"oci:{out}:orig", f"oci:{out}:esgz", ConvertOptions())
    orig: Any = find_manifest(out, "orig")
    esgz: Any = find_manifest(out, "esgz")
    files = merged_regular_files(
        [out / "blobs" / "sha256" / d["digest"].split(":")[1] for d in orig["layers"]]
    )
    config = json.loads((out / "blobs" / "sha256" / esgz["config"]["digest"][7:]).read_text())
    return Image(out, list(esgz["layers"]), files, config["rootfs"]["diff_ids"])


def open_cost(path: Path) -> tuple[int, int]:
    """(GET requests, bytes) our daemon needs to open a layer from the registry: the
    resolve probe (the blob's last TAIL_PROBE_SIZE bytes), and the rest of the TOC region
    when the probe did not bring all of it."""
    data = path.read_bytes()
    size = len(data)
    probe = min(size, TAIL_PROBE_SIZE)
    toc_offset = parse_footer(data[-probe:], size).toc_offset
    return (1, probe) if toc_offset >= size - probe else (2, size - toc_offset)


def layer_gets(reg: Registry, digest: str) -> tuple[int, int]:
    gets = [r for r in reg.blob_requests(digest) if r.method == "GET"]
    assert all(r.status in (200, 206) for r in gets), gets
    return len(gets), sum(r.size for r in gets)


def rpull(c: Containerd, ref: str) -> None:
    run(["ctr-remote", "-a", c.address, "-n", NS, "images", "rpull", "--plain-http", ref])


def rootfs_files(root: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            if p.is_file() and not p.is_symlink():
                data = p.read_bytes()
                out["/" + str(p.relative_to(root))] = (hashlib.sha256(data).hexdigest(), len(data))
    return out


def times(sd: StargzDaemon, msg: str) -> dict[str, datetime.datetime]:
    """Layer digest -> time of the first daemon log record ``msg`` about it."""
    out: dict[str, datetime.datetime] = {}
    for r in sd.log_records():
        if r.get("msg") == msg and "layer" in r:
            out.setdefault(r["layer"], datetime.datetime.fromisoformat(r["time"]))
    return out


def assert_quiet(sd: StargzDaemon) -> None:
    bad = [r for r in sd.log_records() if r["level"] in ("warning", "error", "critical", "fatal")]
    assert not bad, bad


@pytest.mark.parametrize("on", [True, False], ids=["resolve_neighbours", "off"])
def test_rpull_fetches_each_toc_once(image, logged_registry, lazy_stack, on):
    ref = logged_registry.push_oci(image.layout, "esgz", "neighbours:esgz")
    config = ("" if on else "resolve_neighbours = false\n") + BASE_CONFIG
    sd, c = lazy_stack(config)
    rpull(c, ref)

    digests = [d["digest"] for d in image.layers]
    # every layer lazily mounted, none unpacked
    prepared = [
        r["remote-snapshot-prepared"] for r in sd.log_records() if "remote-snapshot-prepared" in r
    ]
    assert prepared == ["true"] * N_LAYERS
    # each layer's footer + TOC came from the registry once: what one open costs
    for d in digests:
        assert layer_gets(logged_registry, d) == open_cost(image.blob(d)), d

    mounted = times(sd, "mounting a layer")
    started = times(sd, "pre-resolving a neighbour layer")
    assert set(mounted) == set(digests)
    if on:
        # the first Prepare started every other layer's fetch, each before its own Prepare
        assert set(started) == set(digests[1:])
        for d in digests[1:]:
            assert started[d] < mounted[d], d
        assert started[digests[-1]] < mounted[digests[1]]
    else:
        assert started == {}

    with mounted_image(c, ref, NS) as root:
        assert rootfs_files(root) == image.files
    assert_quiet(sd)


def test_cri_pull_uses_the_image_layers_label(image, logged_registry, e2e_host):
    """containerd's CRI plugin (what the kubelet drives) names the layers in
    ``containerd.io/snapshot/cri.image-layers``: the same pre-resolve, each TOC once."""
    ref = logged_registry.push_oci(image.layout, "esgz", "neighbours:cri")
    sd = StargzDaemon.start(config_text=BASE_CONFIG)
    c = None
    try:
        c = Containerd.start(sd.address, cri_registry=logged_registry.host)
        c.cri_pull(ref)
        digests = [d["digest"] for d in image.layers]
        for d in digests:
            assert layer_gets(logged_registry, d) == open_cost(image.blob(d)), d
        mounted = times(sd, "mounting a layer")
        started = times(sd, "pre-resolving a neighbour layer")
        assert set(mounted) == set(digests) and set(started) == set(digests[1:])
        assert all(started[d] < mounted[d] for d in digests[1:])
        with mounted_image(c, ref, "k8s.io") as root:
            assert rootfs_files(root) == image.files
        assert_quiet(sd)
    finally:
        if c is not None:
            c.close()
        sd.close()


# --- a label naming a layer the repository does not have ----------------------------------------


@pytest.fixture
def lazy_daemon(e2e_host: None) -> Iterator[StargzDaemon]:
    d = StargzDaemon.start(config_text=BASE_CONFIG)
    try:
        yield d
    finally:
        d.close()


def chain_ids(diff_ids: list[str]) -> list[str]:
    out, chain = [], ""
    for diff_id in diff_ids:
        chain = (
            diff_id
            if not chain
            else "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
        )
        out.append(chain)
    return out


def test_missing_neighbour_digest_is_logged_and_harmless(image, logged_registry, lazy_daemon):
    """What containerd's unpacker sends (over gRPC, as in the key-space tests), with a layers
    label that also names a digest the repository does not have and a malformed entry."""
    ref = logged_registry.push_oci(image.layout, "esgz", "neighbours:esgz")
    digests = [d["digest"] for d in image.layers]
    sd = lazy_daemon
    parent = ""
    with sd.channel() as ch:
        stub = sd.stub(ch)
        for n, (desc, chain) in enumerate(
            zip(image.layers, chain_ids(image.diff_ids), strict=True)
        ):
            labels = {
                TARGET_SNAPSHOT_LABEL: chain,
                "containerd.io/snapshot/remote/stargz.reference": ref,
                "containerd.io/snapshot/remote/stargz.digest": desc["digest"],
                "containerd.io/snapshot/remote/stargz.layers": ",".join(
                    [*digests[n:], MISSING, "sha256:nope"]
                ),
                TOC_LABEL: desc["annotations"][TOC_LABEL],
            }
            req = pb.PrepareSnapshotRequest(
                key=f"extract-{n} {chain}", parent=parent, labels=labels
            )
            with pytest.raises(grpc.RpcError) as e:
                stub.Prepare(req, timeout=60)
            assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS, e.value.details()
            parent = chain
        # the pull went on as if the label did not name it: every layer opened once
        for d in digests:
            assert layer_gets(logged_registry, d) == open_cost(image.blob(d)), d
        failed = [
            r
            for r in sd.log_records()
            if r.get("msg") == "cannot pre-resolve a neighbour layer; its own mount will try"
        ]
        assert [r["layer"] for r in failed] == [MISSING]
        assert failed[0]["level"] == "info"
        assert any(
            r.get("msg") == "not pre-resolving a neighbour layer: not a sha256 digest"
            for r in sd.log_records()
        )
        assert_quiet(sd)
        # and the tree is right
        view = stub.View(pb.ViewSnapshotRequest(key="neighbours-view", parent=parent), timeout=30)
        target = make_tempdir("sgz-nb-")
        try:
            for m in view.mounts:
                argv = ["mount"] if m.type == "bind" else ["mount", "-t", m.type]
                run([*argv, "-o", ",".join(m.options), m.source, str(target)])
            assert rootfs_files(target) == image.files
        finally:
            unmount_under(target)
            target.rmdir()
