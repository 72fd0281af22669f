"""An image made by ``stargz optimize`` in production: pushed to a real docker-registry,
lazily pulled through our daemon by Go's ``ctr-remote i rpull`` into a real containerd,
and run with ``ctr run --snapshotter stargz``. With background fetch off, everything the
workload reads must already be in the prefetch range (files up to ``.prefetch.landmark``),
so the registry's access log shows no on-demand fetch after the prefetch. The merged tree
is the corners fixture's overlayfs ground truth plus busybox's own files.

Go's ``ctr-remote i optimize`` runs here too (it needs containerd with the overlayfs
snapshotter and fanotify): the same workload on the same image gives the same per-layer
prefetch lists, printed side by side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from harness import Containerd, Registry, StargzDaemon, mounted_image, run, tree_listing
from harness.oci import stack_images
from harness.procs import REPO

from stargz.estargz import open_file
from stargz.estargz.toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK

from .test_lazy import (
    NO_BACKGROUND,
    NS,
    TAIL,
    assert_lazily_mounted,
    assert_quiet_log,
    busybox_bin,
    ctr_run,
    ground_truth,
    layers_of,
    rpull,
    tar_files,
)

pytestmark = [pytest.mark.e2e, pytest.mark.interop, pytest.mark.timeout(300)]

WORKLOAD = "cat /etc/greeting /data/xattr-file; ls /bin"
CONFIG = NO_BACKGROUND + "[fuse]\npassthrough = false\n"


def optimize(layout: Path, src: str, dst: str, record: Path) -> None:
    run(
        [
            sys.executable,
            "-m",
            "stargz.cli.main",
            "optimize",
            "--entrypoint",
            '["/bin/sh","-c"]',
            "--args",
            json.dumps([WORKLOAD]),
            "--record-out",
            str(record),
            f"oci:{layout}:{src}",
            f"oci:{layout}:{dst}",
        ],
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
    )


def prefetch_list(blob: Path) -> list[str] | None:
    """Regular files before ``.prefetch.landmark`` (None: ``.no.prefetch.landmark``)."""
    with open_file(str(blob)) as r:
        entries = [(e.name, e.type) for e in r.toc.entries]
    names = [n for n, _ in entries]
    if NO_PREFETCH_LANDMARK in names:
        return None
    return [n for n, t in entries[: names.index(PREFETCH_LANDMARK)] if t == "reg"]


def blob_file(layout: Path, desc: dict[str, Any]) -> Path:
    return layout / "blobs" / "sha256" / desc["digest"].split(":")[1]


@pytest.fixture
def stacked(shared: Path, tmp_path: Path) -> Path:
    """busybox ``1`` under corners ``orig`` (three plain tar+gzip layers)."""
    fixtures = shared / "fixtures"
    return stack_images(
        tmp_path / "stack",
        "1",
        [(fixtures / "oci-busybox", "1"), (fixtures / "oci-corners", "orig")],
    )


def test_optimized_image_runs_lazily_from_its_prefetch_range(
    stacked, logged_registry, lazy_stack, shared, tmp_path
):
    optimize(stacked, "1", "opt", tmp_path / "record.json")
    layers = layers_of(stacked, "opt")
    lists = [prefetch_list(blob_file(stacked, d)) for d in layers]
    print("stargz optimize prefetch lists:", lists)
    # corners' first layer has its own /etc/greeting (it hides busybox's); its second
    # layer holds nothing the workload reads
    assert lists == [["bin/busybox"], ["etc/greeting", "data/xattr-file"], None]
    prefetch = {}
    for d in layers:
        with open_file(str(blob_file(stacked, d))) as r:
            prefetch[d["digest"]] = r.prefetch_size or 0

    sd, c = lazy_stack(CONFIG)
    ref = logged_registry.push_oci(stacked, "opt", "stack:opt")
    rpull(c, ref)
    assert_lazily_mounted(sd, c, layers)
    out = ctr_run(c, ref, "optimized", "sh", "-c", WORKLOAD)
    corners = tar_files(shared, "oci-corners", "orig")
    names = sorted({*busybox_bin(shared), "setuid-tool"})
    assert (
        out.encode()
        == corners["etc/greeting"]
        + corners["data/xattr-file"]
        + "".join(f"{n}\n" for n in names).encode()
    )
    for d in layers:
        gets = [r.size for r in logged_registry.blob_requests(d["digest"]) if r.method == "GET"]
        print(d["digest"][:19], "GET sizes", gets, "prefetch", prefetch[d["digest"]], d["size"])
        # opening the layer: the probe (it brings the blob's last bytes) and at most one
        # more GET for the rest of the footer + TOC; then the prefetch range, once; nothing
        # else (an on-demand read would be a further GET); 1-byte GETs are connectivity checks
        rest = [n for n in gets if n != 1]
        if prefetch[d["digest"]]:
            assert prefetch[d["digest"]] in rest, (gets, prefetch[d["digest"]])
            rest.remove(prefetch[d["digest"]])
        assert len(rest) <= 2 and sum(rest) <= TAIL, gets
    assert_quiet_log(sd)

    with mounted_image(c, ref, NS) as root:
        got = tree_listing(root)
    truth = ground_truth(shared)
    # the corners ground truth, exactly, plus busybox's own paths (under corners' dirs)
    assert {p: got["entries"][p] for p in truth["entries"]} == truth["entries"]
    extra = set(got["entries"]) - set(truth["entries"])
    assert extra == {"bin/" + n for n in busybox_bin(shared)}


def test_go_ctr_remote_optimize_gives_the_same_prefetch_lists(
    stacked, registry: Registry, tmp_path
):
    """Go's ``ctr-remote i optimize`` (fanotify on an overlayfs rootfs, in containerd) and
    ours (FUSE opens, runc) on the same image and workload: the same files, in the same
    order, before each layer's landmark."""
    optimize(stacked, "1", "opt", tmp_path / "ours.json")
    ours = [prefetch_list(blob_file(stacked, d)) for d in layers_of(stacked, "opt")]
    sd = StargzDaemon.start(extra_args=["--no-lazy"])
    c = Containerd.start(sd.address)
    try:
        ref = registry.push_oci(stacked, "1", "stack:1")
        c.ctr("images", "pull", "--plain-http", ref, ns="goopt")
        go_record = tmp_path / "go.json"
        proc = subprocess.run(
            [
                "ctr-remote",
                "-a",
                c.address,
                "-n",
                "goopt",
                "images",
                "optimize",
                "--oci",
                "--period",
                "10",
                "--entrypoint",
                '["/bin/sh","-c"]',
                "--args",
                json.dumps([WORKLOAD]),
                "--record-out",
                str(go_record),
                ref,
                ref + "-goopt",
            ],
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert proc.returncode == 0, proc.stderr
        target = c.ctr("images", "ls", ns="goopt").stdout
        digest = next(
            line.split()[2] for line in target.splitlines() if line.startswith(ref + "-goopt ")
        )
        manifest = json.loads(c.ctr("content", "get", digest, ns="goopt").stdout)
        go = []
        for d in manifest["layers"]:
            blob = tmp_path / d["digest"].split(":")[1]
            with open(blob, "wb") as f:
                subprocess.run(
                    ["ctr", "-a", c.address, "-n", "goopt", "content", "get", d["digest"]],
                    stdout=f,
                    check=True,
                    timeout=60,
                )
            go.append(prefetch_list(blob))
    finally:
        c.close()
        sd.close()
    print("prefetch lists, stargz optimize:", ours)
    print("prefetch lists, Go ctr-remote:  ", go)
    assert ours == go
    # Go's record may repeat a path (one line per fanotify event); ours lists each once
    go_entries = []
    for line in go_record.read_text().splitlines():
        e = json.loads(line)
        if e not in go_entries:
            go_entries.append(e)
    our_entries = [json.loads(x) for x in (tmp_path / "ours.json").read_text().splitlines()]
    assert our_entries == go_entries
