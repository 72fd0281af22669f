"""``stargz rpull`` end to end: our Python client of containerd's API asks a real
containerd 1.6 for a lazy pull into our daemon, from a real docker-registry, then ``ctr run
--snapshotter stargz`` runs the image. Go's ``ctr-remote i rpull`` is the reference: the
same image pulled by both leaves the same snapshot chain, image record and content labels.

What was fetched is read from the registry's access log; what containerd holds from
``ctr images ls``, ``ctr content ls`` and ``ctr snapshots ls/info``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from harness import (
    Containerd,
    StargzDaemon,
    free_port,
    mounted_image,
    mounts_under,
    run,
    tree_listing,
)
from harness.faults import BasicAuth, Body, Proxy, ProxyThread
from harness.oci import find_manifest, index_image, stack_images
from harness.procs import REPO

from e2e.test_lazy import (
    BUSYBOX_WORKLOAD,
    NO_BACKGROUND,
    assert_quiet_log,
    busybox_expected_output,
    ground_truth,
    layers_of,
    prepared_flags,
    tar_files,
)
from stargz.containerd import labels as L

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

NS = "rpull"
SNAP = ("--snapshotter", "stargz")
CRI_LABELS = {L.CRI_IMAGE_REF, L.CRI_LAYER_DIGEST, L.CRI_IMAGE_LAYERS, L.CRI_MANIFEST_DIGEST}


def stargz_rpull(
    address: str,
    ref: str,
    *flags: str,
    ns: str = NS,
    check: bool = True,
    daemon: StargzDaemon | str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``stargz rpull`` as a user runs it (this checkout's sources): made by ``daemon``
    (``--daemon-address``: a daemon, or the socket to ask), or without one in this
    process (``--in-process``)."""
    where = ["--in-process"]
    if daemon is not None:
        where = ["--daemon-address", daemon if isinstance(daemon, str) else daemon.address]
    p = run(
        [
            *(sys.executable, "-m", "stargz.cli.main", "rpull"),
            *("-a", address, "-n", ns, *where, *flags, ref),
        ],
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
        check=check,
        timeout=120,
    )
    if isinstance(daemon, StargzDaemon) and p.returncode == 0:
        assert p.stderr == "", p.stderr  # the daemon pulled: no fallback to this process
    return p


#: Both ways ``stargz rpull`` pulls: made by the daemon it asks, or in its own process.
PATHS = ["daemon", "in-process"]


def pulled_by(path: str, sd: StargzDaemon) -> StargzDaemon | None:
    return sd if path == "daemon" else None


def daemon_pulls(sd: StargzDaemon) -> list[dict[str, Any]]:
    """The daemon's ``pulled`` log records (one per pull it made for ``stargz rpull``)."""
    return [r for r in sd.log_records() if r.get("msg") == "pulled"]


def go_rpull(c: Containerd, ref: str, ns: str = NS) -> None:
    run(["ctr-remote", "-a", c.address, "-n", ns, "images", "rpull", "--plain-http", ref])


def content(c: Containerd, ns: str = NS) -> dict[str, tuple[int, dict[str, str]]]:
    """``ctr content ls``: digest -> (size, labels)."""
    out = {}
    for line in c.ctr("content", "ls", ns=ns).stdout.splitlines()[1:]:
        cols = line.split("\t")
        labels = dict(kv.split("=", 1) for kv in cols[-1].split(",") if "=" in kv)
        out[cols[0]] = (_bytes(cols[1]), labels)
    return out


def _bytes(text: str) -> int:
    units = {"B": 1, "kB": 1000, "MB": 1000**2, "GB": 1000**3}
    for u in sorted(units, key=len, reverse=True):
        if text.endswith(u):
            return round(float(text[: -len(u)]) * units[u])
    raise AssertionError(f"size {text!r}")


def images(c: Containerd, ns: str = NS) -> list[list[str]]:
    return [line.split() for line in c.ctr("images", "ls", ns=ns).stdout.splitlines()[1:]]


def snapshots(c: Containerd, ns: str = NS) -> list[list[str]]:
    """``ctr snapshots ls`` rows (key, [parent,] kind), sorted."""
    out = c.ctr("snapshots", *SNAP, "ls", ns=ns).stdout
    return sorted(line.split() for line in out.splitlines()[1:])


def snapshot_labels(c: Containerd, key: str, ns: str = NS) -> dict[str, str]:
    return json.loads(c.ctr("snapshots", *SNAP, "info", key, ns=ns).stdout).get("Labels", {})


def layer_lines(out: str) -> list[str]:
    """What ``stargz rpull`` said about each layer (the text after the digest)."""
    return [line.split(": ", 2)[2] for line in out.splitlines() if line.startswith("layer ")]


def assert_remote_snapshots(sd: StargzDaemon, c: Containerd, layers: list[dict[str, Any]]):
    """Every layer is a remote snapshot: the daemon mounted each from the registry
    (``remote-snapshot-prepared=true`` once per layer, a ``fuse.stargz`` mount per layer),
    and containerd's content store holds the manifest and config but no layer blob."""
    assert prepared_flags(sd) == ["true"] * len(layers), sd.log_text()[-3000:]
    mounts = mounts_under(Path(sd.root) / "snapshots")
    assert sorted(m.root for m in mounts.values()) == sorted(
        "/" + d["digest"].split(":")[1] for d in layers
    )
    assert all(m.fstype == "fuse.stargz" for m in mounts.values()), mounts
    held = content(c)
    assert held and not set(held) & {d["digest"] for d in layers}, held


# --- eStargz images: every layer lazy ------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tag", ["esgz", "zstdchunked"])
def test_rpull_corners_mounts_every_layer_remotely_with_the_ground_truth_tree(
    tag, path, logged_registry, lazy_stack, shared
):
    """``stargz rpull`` of the Go-made ``oci-corners`` eStargz / zstd:chunked tag: both layers
    become remote snapshots (daemon log, FUSE mounts, no layer blob in containerd's content
    store, never a whole-blob GET at the registry), the command says so per layer, the
    config carries the ``gc.ref.snapshot.stargz`` label of the top chain ID, no lease is
    left behind, and the merged rootfs equals the overlayfs ground truth exactly."""
    sd, c = lazy_stack(NO_BACKGROUND)
    layout = shared / "fixtures" / "oci-corners"
    layers = layers_of(layout, tag)
    ref = logged_registry.push_oci(layout, tag, f"corners:{tag}")
    out = stargz_rpull(c.address, ref, daemon=pulled_by(path, sd)).stdout
    assert layer_lines(out) == ["remote snapshot (lazy)"] * 2, out
    assert len(daemon_pulls(sd)) == (1 if path == "daemon" else 0)
    assert_remote_snapshots(sd, c, layers)
    for d in layers:
        gets = [r for r in logged_registry.blob_requests(d["digest"]) if r.method == "GET"]
        assert gets and all(r.status == 206 for r in gets), gets
    man = find_manifest(layout, tag)
    config = content(c)[man["config"]["digest"]][1]  # type: ignore[index]
    top = snapshots(c)[-1]
    assert config[L.snapshot_gc_label("stargz")] in {row[0] for row in snapshots(c)}
    assert top[-1] == "Committed"
    assert c.ctr("leases", "ls", "-q", ns=NS).stdout.split() == []
    with mounted_image(c, ref, NS) as root:
        got = tree_listing(root)
    assert got == ground_truth(shared)
    assert_quiet_log(sd)


@pytest.mark.parametrize("path", PATHS)
def test_rpull_busybox_runs_with_ctr_run_without_pulling_again(
    path, logged_registry, lazy_stack, shared
):
    """busybox ``esgz`` pulled by ``stargz rpull``: ``ctr run --snapshotter stargz`` finds it
    unpacked and runs ``cat /etc/greeting; ls /bin`` from the lazily mounted layer (the
    plain image's greeting and /bin listing). The run fetched no layer blob into
    containerd (``ctr run`` would have to, to unpack it), and pulling again reports the
    layer as already there."""
    sd, c = lazy_stack(NO_BACKGROUND)
    layout = shared / "fixtures" / "oci-busybox"
    layers = layers_of(layout, "esgz")
    ref = logged_registry.push_oci(layout, "esgz", "busybox:esgz")
    stargz_rpull(c.address, ref, daemon=pulled_by(path, sd))
    assert_remote_snapshots(sd, c, layers)
    before = content(c)
    out = c.ctr("run", "--rm", *SNAP, ref, "bb-esgz", *BUSYBOX_WORKLOAD, ns=NS).stdout
    assert out == busybox_expected_output(shared)
    assert content(c) == before
    again = stargz_rpull(c.address, ref, daemon=pulled_by(path, sd)).stdout
    assert layer_lines(again) == ["already unpacked"], again
    assert_quiet_log(sd)


# --- the same as Go's ctr-remote ----------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_go_and_python_rpull_leave_the_same_image(path, registry, lazy_stack, shared, tmp_path):
    """A two-platform image index (linux/amd64: corners ``esgz``; linux/arm64: busybox
    ``esgz``) pulled by Go's ``ctr-remote i rpull`` into one stack and by ``stargz rpull``
    into another (each its own daemon and containerd, so neither sees the other's
    snapshots): the same image record (``ctr images ls``: name, index type and digest,
    size, platforms), the same snapshot chain (names, parents, kinds), the same blobs in
    the content store with the same labels (GC references to all the index's manifests,
    the manifest's config and layers, the config's top snapshot, the distribution
    source), and on each snapshot every label Go's pull set, ours adding only
    containerd's CRI set."""
    layout = index_image(
        tmp_path / "multi",
        "1",
        [
            (shared / "fixtures" / "oci-corners", "esgz", "linux/amd64"),
            (shared / "fixtures" / "oci-busybox", "esgz", "linux/arm64"),
        ],
    )
    ref = registry.push_oci(layout, "1", "multi:1", all_platforms=True)
    sd_go, c_go = lazy_stack(NO_BACKGROUND)
    sd_py, c_py = lazy_stack(NO_BACKGROUND)
    go_rpull(c_go, ref)
    stargz_rpull(c_py.address, ref, daemon=pulled_by(path, sd_py))

    assert images(c_py) == images(c_go)
    (row,) = images(c_py)
    assert row[0] == ref and row[1] == "application/vnd.oci.image.index.v1+json", row
    assert row[-2] == "linux/amd64,linux/arm64", row
    assert snapshots(c_py) == snapshots(c_go) and len(snapshots(c_py)) == 2
    assert content(c_py) == content(c_go)
    index = content(c_py)[row[2]][1]
    assert {k for k in index if k.startswith("containerd.io/gc.ref.content.m.")} == {
        "containerd.io/gc.ref.content.m.0",
        "containerd.io/gc.ref.content.m.1",
    }
    for key, *_ in snapshots(c_py):
        go, py = snapshot_labels(c_go, key), snapshot_labels(c_py, key)
        assert go.items() <= py.items(), (go, py)
        assert set(py) - set(go) <= CRI_LABELS, set(py) - set(go)
        assert py[L.SNAPSHOT_REF] == key and py[L.CRI_IMAGE_REF] == ref
    for sd in (sd_go, sd_py):
        assert prepared_flags(sd) == ["true", "true"]
        assert_quiet_log(sd)


def test_platform_flag_picks_the_other_manifest(registry, lazy_stack, shared, tmp_path):
    """``--platform linux/arm64`` on the two-platform index pulls busybox's manifest (its one
    layer, lazily), not the host's."""
    layout = index_image(
        tmp_path / "multi",
        "1",
        [
            (shared / "fixtures" / "oci-corners", "esgz", "linux/amd64"),
            (shared / "fixtures" / "oci-busybox", "esgz", "linux/arm64"),
        ],
    )
    ref = registry.push_oci(layout, "1", "multi-platform:1", all_platforms=True)
    sd, c = lazy_stack(NO_BACKGROUND)
    out = stargz_rpull(c.address, ref, "--platform", "linux/arm64").stdout
    busybox = layers_of(shared / "fixtures" / "oci-busybox", "esgz")
    assert [line.split(": ")[1] for line in out.splitlines() if line.startswith("layer ")] == [
        busybox[0]["digest"]
    ], out
    assert_remote_snapshots(sd, c, busybox)


# --- layers that are not eStargz ----------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_plain_gzip_layers_fall_back_to_unpacking(
    path, logged_registry, lazy_stack, shared, tmp_path
):
    """An image of a plain tar+gzip busybox layer under the two eStargz ``oci-corners``
    layers: the daemon refuses the plain layer (no TOC digest), so ``stargz rpull``
    downloads its blob (one whole GET), has containerd unpack it and commits it (the blob
    is in the content store, labelled with its diff ID), then the eStargz layers on top of
    it are remote snapshots; a container runs from the mixed chain and sees files of
    both."""
    sd, c = lazy_stack(NO_BACKGROUND)
    fixtures = shared / "fixtures"
    layout = stack_images(
        tmp_path / "mixed",
        "1",
        [(fixtures / "oci-busybox", "1"), (fixtures / "oci-corners", "esgz")],
    )
    plain, *lazy = layers_of(layout, "1")
    ref = logged_registry.push_oci(layout, "1", "mixed:1")
    out = stargz_rpull(c.address, ref, daemon=pulled_by(path, sd)).stdout
    assert layer_lines(out) == [
        f"unpacked ({plain['size']} bytes fetched)",
        "remote snapshot (lazy)",
        "remote snapshot (lazy)",
    ], out
    assert prepared_flags(sd) == ["false", "true", "true"]
    held = content(c)
    config = find_manifest(layout, "1")["config"]["digest"].split(":")[1]  # type: ignore[index]
    diff_ids = json.loads((layout / "blobs" / "sha256" / config).read_bytes())["rootfs"]
    assert held[plain["digest"]][1][L.UNCOMPRESSED] == diff_ids["diff_ids"][0]
    assert not set(held) & {d["digest"] for d in lazy}
    gets = [r for r in logged_registry.blob_requests(plain["digest"]) if r.method == "GET"]
    assert [(r.status, r.size) for r in gets] == [(200, plain["size"])], gets
    out = c.ctr("run", "--rm", *SNAP, ref, "mixed", "sh", "-c", "cat /etc/greeting", ns=NS).stdout
    assert out.encode() == tar_files(shared, "oci-corners", "orig")["etc/greeting"]


def collect_garbage(c: Containerd) -> None:
    """Run containerd's garbage collector now (it runs when a lease is removed with
    ``--sync``; the harness's containerd never runs it on its own)."""
    lease = c.ctr("leases", "create", ns=NS).stdout.split()[0]
    c.ctr("leases", "rm", "--sync", lease, ns=NS)


def test_garbage_collection_keeps_the_image_and_drops_it_with_the_record(
    logged_registry, lazy_stack, shared, tmp_path
):
    """What ``stargz rpull`` leaves is held by the image record alone (its lease is gone):
    containerd's garbage collector keeps every blob and snapshot of the mixed image (plain
    layer unpacked, eStargz layers remote), so a container still runs; once the record is
    removed, the collector drops them all, following the same labels."""
    sd, c = lazy_stack(NO_BACKGROUND)
    fixtures = shared / "fixtures"
    layout = stack_images(
        tmp_path / "mixed",
        "1",
        [(fixtures / "oci-busybox", "1"), (fixtures / "oci-corners", "esgz")],
    )
    ref = logged_registry.push_oci(layout, "1", "gc:1")
    stargz_rpull(c.address, ref)
    held, chain = content(c), snapshots(c)
    assert len(held) == 3 and len(chain) == 3, (held, chain)
    collect_garbage(c)
    assert content(c) == held and snapshots(c) == chain
    out = c.ctr("run", "--rm", *SNAP, ref, "gc", "cat", "/etc/greeting", ns=NS).stdout
    assert out.encode() == tar_files(shared, "oci-corners", "orig")["etc/greeting"]
    c.ctr("images", "rm", "--sync", ref, ns=NS)
    assert content(c) == {} and snapshots(c) == []


def test_plain_corners_unpacked_equals_the_ground_truth(
    stargz_daemon, containerd, registry, shared
):
    """Lazy pulling off in the daemon (``--no-lazy``): every layer of plain ``oci-corners``
    is pulled and unpacked through containerd's diff service onto our snapshots, and the
    merged tree equals the ground truth (whiteouts, opaque dir, devices, xattrs...)."""
    layout = shared / "fixtures" / "oci-corners"
    ref = registry.push_oci(layout, "orig", "corners-plain:orig")
    out = stargz_rpull(containerd.address, ref).stdout
    sizes = [d["size"] for d in layers_of(layout, "orig")]
    assert layer_lines(out) == [f"unpacked ({n} bytes fetched)" for n in sizes], out
    with mounted_image(containerd, ref, NS) as root:
        got = tree_listing(root)
    assert got == ground_truth(shared)
    assert containerd.ctr("leases", "ls", "-q", ns=NS).stdout.split() == []


# --- credentials -------------------------------------------------------------------------


def test_user_flag_authenticates_to_the_registry(stargz_daemon, containerd, registry, shared):
    """A registry behind HTTP basic auth (a proxy in front of the real one): without
    ``--user`` the pull fails with one line naming the 401; with ``--user USER:PASSWORD``
    it succeeds (the daemon has no credentials, so the layer is unpacked)."""
    registry.push_oci(shared / "fixtures" / "oci-busybox", "1", "private:1")
    with ProxyThread() as pt:
        proxy = pt.start(f"http://{registry.host}", BasicAuth("alice", "s3cret"))
        gated = f"{proxy.netloc}/private:1"
        p = stargz_rpull(containerd.address, gated, check=False)
        assert p.returncode == 1, p
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "401" in p.stderr, p.stderr
        p = stargz_rpull(containerd.address, gated, "--user", "alice:s3cret")
        assert layer_lines(p.stdout) == [f"unpacked ({layers_of_size(shared)} bytes fetched)"]
    out = containerd.ctr("run", "--rm", *SNAP, gated, "auth", "cat", "/etc/greeting", ns=NS)
    assert out.stdout == "hi\n"


@dataclass
class CutFirstGet:
    """The first GET of blob ``digest`` gets half its body, then a reset."""

    digest: str
    cut: int = 0

    async def __call__(self, proxy: Proxy, request: web.Request) -> web.StreamResponse | None:
        if request.method == "GET" and request.path.endswith(self.digest) and not self.cut:
            self.cut += 1
            return await Body("cut")(proxy, request)
        return None


def test_a_download_cut_short_is_retried_into_the_same_ingest(
    stargz_daemon, containerd, registry, shared
):
    """The layer's download is reset halfway (a proxy in front of the real registry): the
    retry streams it again from offset 0 into the same content ingest, containerd commits
    the right blob (it checks the digest), unpacks it, and a container runs from it."""
    ref = registry.push_oci(shared / "fixtures" / "oci-busybox", "1", "cut:1")
    (layer,) = layers_of(shared / "fixtures" / "oci-busybox", "1")
    hook = CutFirstGet(layer["digest"])
    with ProxyThread() as pt:
        proxy = pt.start(f"http://{registry.host}", hook)
        ref = f"{proxy.netloc}/cut:1"
        out = stargz_rpull(containerd.address, ref).stdout
        gets = proxy.requests("GET", "/blobs/" + layer["digest"])
    assert hook.cut == 1 and len(gets) == 2, gets
    assert layer_lines(out) == [f"unpacked ({layer['size']} bytes fetched)"], out
    assert L.UNCOMPRESSED in content(containerd)[layer["digest"]][1]
    out = containerd.ctr("run", "--rm", *SNAP, ref, "cut", "cat", "/etc/greeting", ns=NS)
    assert out.stdout == "hi\n"


def non_loopback_ipv4() -> str:
    """An IPv4 address of this machine that is not loopback (so not plain http by default)."""
    out = run(["ip", "-4", "-o", "addr", "show", "scope", "global"]).stdout
    addrs = [line.split()[3].split("/")[0] for line in out.splitlines()]
    assert addrs, f"no non-loopback IPv4 address on this machine:\n{out}"
    return addrs[0]


def test_plain_http_flag_for_a_registry_that_is_not_loopback(
    stargz_daemon, containerd, registry, shared
):
    """The registry reached at this machine's non-loopback address (a proxy in front of the
    real one): https by default, so the pull fails with one line (no TLS there); with
    ``--plain-http`` it is pulled and runs."""
    registry.push_oci(shared / "fixtures" / "oci-busybox", "1", "plain:1")
    with ProxyThread() as pt:
        proxy = pt.start(f"http://{registry.host}", host=non_loopback_ipv4())
        ref = f"{proxy.netloc}/plain:1"
        p = stargz_rpull(containerd.address, ref, check=False)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p
        assert f"https://{proxy.netloc}/v2/" in p.stderr, p.stderr
        stargz_rpull(containerd.address, ref, "--plain-http")
        assert proxy.requests("GET", "/manifests/1")
    out = containerd.ctr("run", "--rm", *SNAP, ref, "plain", "cat", "/etc/greeting", ns=NS)
    assert out.stdout == "hi\n"


def layers_of_size(shared: Path) -> int:
    (d,) = layers_of(shared / "fixtures" / "oci-busybox", "1")
    return int(d["size"])


# --- bad input ----------------------------------------------------------------------------


def one_line_error(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 1, p
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stargz: error: "), p.stderr
    return lines[0]


def test_unknown_tag_is_one_clear_line(stargz_daemon, containerd, registry, shared):
    registry.push_oci(shared / "fixtures" / "oci-busybox", "1", "known:1")
    p = stargz_rpull(containerd.address, registry.ref("known:nope"), check=False)
    msg = one_line_error(p)
    assert "known:nope" in msg and "404" in msg and "MANIFEST_UNKNOWN" in msg, msg
    assert images(containerd) == []
    assert containerd.ctr("leases", "ls", "-q", ns=NS).stdout.split() == []


def test_unreachable_registry_is_one_clear_line(stargz_daemon, containerd):
    port = free_port()  # nothing listens there
    p = stargz_rpull(containerd.address, f"127.0.0.1:{port}/app:1", check=False)
    msg = one_line_error(p)
    assert f"127.0.0.1:{port}" in msg and "retries" in msg, msg
    assert containerd.ctr("leases", "ls", "-q", ns=NS).stdout.split() == []


def test_unknown_snapshotter_is_one_clear_line(stargz_daemon, containerd, registry, shared):
    ref = registry.push_oci(shared / "fixtures" / "oci-busybox", "1", "snap:1")
    p = stargz_rpull(containerd.address, ref, "--snapshotter", "nope", check=False)
    msg = one_line_error(p)
    assert "nope" in msg and "containerd Snapshots." in msg, msg


def test_snapshotter_down_is_named_not_containerd(stargz_daemon, containerd, registry, shared):
    """Our daemon stopped: containerd answers, its proxy to the snapshotter does not. The
    one-line error names the snapshot call that failed (containerd's words for the broken
    proxy connection follow), not containerd as the one out of reach."""
    ref = registry.push_oci(shared / "fixtures" / "oci-busybox", "1", "down:1")
    stargz_daemon.stop()
    msg = one_line_error(stargz_rpull(containerd.address, ref, check=False))
    assert msg.startswith("stargz: error: containerd Snapshots."), msg
    assert "cannot reach containerd" not in msg, msg
