"""Lazy pulling end to end: real containerd 1.6 + runc, a real docker-registry,
Debian's Go ``ctr-remote i rpull`` (the client that sets the remote-snapshot labels), and
our daemon started WITHOUT ``--no-lazy``, so eStargz layers are mounted from the registry
through our FUSE filesystem instead of being downloaded and unpacked.

What the registry served is read from its own access log (``Registry.blob_requests``): one
line per request with the response's byte count, the server-side record of every fetch.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from harness import (
    Containerd,
    StargzDaemon,
    mounted_image,
    mounts_under,
    run,
    tree_listing,
)
from harness.oci import find_manifest, replace_layer, stack_images
from harness.procs import REPO

from stargz.estargz import open_file
from stargz.service.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb

pytestmark = [pytest.mark.e2e, pytest.mark.interop, pytest.mark.timeout(180)]

NS = "lazy"
SNAP = ("--snapshotter", "stargz")
NO_BACKGROUND = "no_background_fetch = true\n"
#: Upstream default ``[blob] chunk_size``: an on-demand fetch is widened to this many bytes.
CHUNK_SIZE = 50_000
#: Bytes our filesystem reads from a blob's end when it opens a layer (footer + TOC).
TAIL = 64 << 10
#: The workload ``ctr-remote i optimize`` recorded for the busybox ``opt`` tag.
BUSYBOX_WORKLOAD = ("sh", "-c", "cat /etc/greeting; ls /bin")


# --- helpers ----------------------------------------------------------------------------


def rpull(c: Containerd, ref: str) -> None:
    """``ctr-remote i rpull``: the Go client that asks for remote snapshots."""
    run(["ctr-remote", "-a", c.address, "-n", NS, "images", "rpull", "--plain-http", ref])


def ctr_run(c: Containerd, ref: str, name: str, *argv: str) -> str:
    return c.ctr("run", "--rm", *SNAP, ref, name, *argv, ns=NS).stdout


def layers_of(layout: Path, tag: str) -> list[dict[str, Any]]:
    return list(find_manifest(layout, tag)["layers"])  # type: ignore[call-overload]


def writable_copy(src: Path, dst: Path) -> Path:
    """A copy of a (read-only) shared OCI layout that a test may add tags to."""
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    return dst


def ground_truth(shared: Path) -> dict[str, Any]:
    return json.loads((shared / "fixtures" / "oci-corners.merged-tree.json").read_text())


def tar_files(shared: Path, layout: str, tag: str) -> dict[str, bytes]:
    """Regular files of a plain tar+gzip image (layers applied in order, no whiteouts
    needed for the paths the tests read), by path."""
    root = shared / "fixtures" / layout
    files: dict[str, bytes] = {}
    for desc in layers_of(root, tag):
        with tarfile.open(root / "blobs" / "sha256" / desc["digest"].split(":")[1]) as tar:
            for m in tar.getmembers():
                f = tar.extractfile(m) if m.isreg() else None
                if f is not None:
                    files[m.name.removeprefix("./")] = f.read()
    return files


def busybox_bin(shared: Path) -> list[str]:
    """Names under /bin in the busybox fixture's plain (``1``) image."""
    root = shared / "fixtures" / "oci-busybox"
    (desc,) = layers_of(root, "1")
    with tarfile.open(root / "blobs" / "sha256" / desc["digest"].split(":")[1]) as tar:
        names = [m.name.removeprefix("./") for m in tar.getmembers()]
    return sorted(n[4:] for n in names if n.startswith("bin/") and n.count("/") == 1 and n[4:])


def busybox_expected_output(shared: Path) -> str:
    """What ``sh -c 'cat /etc/greeting; ls /bin'`` prints in the busybox image."""
    greeting = tar_files(shared, "oci-busybox", "1")["etc/greeting"].decode()
    return greeting + "".join(f"{n}\n" for n in busybox_bin(shared))


def prepared_flags(sd: StargzDaemon) -> list[str]:
    return [
        r["remote-snapshot-prepared"] for r in sd.log_records() if "remote-snapshot-prepared" in r
    ]


def assert_quiet_log(sd: StargzDaemon) -> None:
    bad = [r for r in sd.log_records() if r["level"] in ("warning", "error", "critical", "fatal")]
    assert not bad, bad


def assert_lazily_mounted(sd: StargzDaemon, c: Containerd, layers: list[dict[str, Any]]) -> None:
    """Every layer is a remote snapshot backed by our FUSE filesystem, none was unpacked.

    - the daemon logged ``remote-snapshot-prepared=true`` once per layer (no ``false``);
    - /proc/self/mountinfo: the daemon's FUSE root ``<root>/fuse`` is ``fuse.stargz``, and
      each layer's snapshot ``fs`` dir is a mount of ``fuse.stargz`` whose root is that
      layer's subtree (``/<digest hex>``): one mount per layer, nothing else mounted there;
    - containerd's content store does not hold the layer blobs (rpull skips fetching a
      layer whose snapshot the snapshotter provides; the unpack path would need them).
    """
    assert prepared_flags(sd) == ["true"] * len(layers), sd.log_text()[-4000:]
    snapshots = Path(os.path.realpath(sd.root)) / "snapshots"
    mounts = mounts_under(snapshots)
    assert all(m.fstype == "fuse.stargz" for m in mounts.values()), mounts
    assert sorted(m.root for m in mounts.values()) == sorted(
        "/" + d["digest"].split(":")[1] for d in layers
    )
    assert all(Path(mp).parent.parent == snapshots and mp.endswith("/fs") for mp in mounts)
    fuse_root = os.path.realpath(Path(sd.root) / "fuse")
    assert mounts_under(fuse_root)[fuse_root].fstype == "fuse.stargz"
    content = set(c.ctr("content", "ls", "-q", ns=NS).stdout.split())
    assert content, "the manifest and config should be in the content store"
    assert not content & {d["digest"] for d in layers}, content


def remote_layer_dirs(sd: StargzDaemon) -> dict[str, Path]:
    """Layer digest -> the snapshot ``fs`` dir it is mounted on."""
    return {
        "sha256:" + m.root.lstrip("/"): Path(mp)
        for mp, m in mounts_under(Path(sd.root) / "snapshots").items()
    }


def poll(what: str, probe, timeout: float):
    """Call ``probe`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)


def daemon_list(sd: StargzDaemon) -> list[pb.Info]:
    """The List RPC, straight to the daemon (one key space: it sees every snapshot)."""
    with sd.channel() as ch:
        return [i for r in sd.stub(ch).List(pb.ListSnapshotsRequest(), timeout=30) for i in r.info]


def convert(layout: Path, src_tag: str, dst_tag: str, *flags: str) -> None:
    """Our converter, as a user runs it: ``stargz convert oci:DIR:SRC oci:DIR:DST``."""
    run(
        [
            sys.executable,
            "-m",
            "stargz.cli.main",
            "convert",
            "-q",
            *flags,
            f"oci:{layout}:{src_tag}",
            f"oci:{layout}:{dst_tag}",
        ],
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
    )


def pread_direct(path: Path, offset: int, size: int = 4096) -> bytes:
    """One read that bypasses the page cache (and so the kernel's read-ahead): exactly the
    bytes asked for reach the filesystem."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, size)  # (aligned, as a passthrough file's disk would require)
    try:
        return buf[: os.preadv(fd, [buf], offset)]
    finally:
        os.close(fd)
        buf.close()


# --- 1. the Go client lazily pulls the reference images -----------------------------------


@pytest.mark.parametrize("tag", ["esgz", "esgz-64k", "zstdchunked"])
def test_rpull_mounts_corners_lazily_with_the_ground_truth_tree(
    tag, logged_registry, lazy_stack, shared
):
    """``ctr-remote i rpull`` of the Go-made ``oci-corners`` eStargz / zstd:chunked tags:
    both layers become FUSE-mounted remote snapshots (daemon log
    ``remote-snapshot-prepared=true`` per layer, the snapshot ``fs`` dirs are
    ``fuse.stargz`` mounts of the layers' subtrees, the layer blobs are not in containerd's
    content store), and the merged rootfs, read entirely through FUSE (background fetch off,
    so every byte comes from on-demand reads), equals the overlayfs ground truth exactly:
    modes, owners, sizes, content hashes, links, devices, xattrs, hardlink groups,
    whiteouts and the opaque dir, and no ``.no.prefetch.landmark`` / ``stargz.index.json``.
    """
    sd, c = lazy_stack(NO_BACKGROUND)
    layout = shared / "fixtures" / "oci-corners"
    layers = layers_of(layout, tag)
    ref = logged_registry.push_oci(layout, tag, f"corners:{tag}")
    rpull(c, ref)
    assert_lazily_mounted(sd, c, layers)
    # Pulled, yet only the footer/TOC end of each blob was read (no prefetch: the
    # .no.prefetch.landmark), and the blobs were never GET whole (no 200 answer).
    for d in layers:
        assert logged_registry.blob_bytes(d["digest"]) <= 1 + TAIL, d
        gets = [r for r in logged_registry.blob_requests(d["digest"]) if r.method == "GET"]
        assert gets and all(r.status == 206 for r in gets), gets
    with mounted_image(c, ref, NS) as root:
        got = tree_listing(root)
    assert got == ground_truth(shared)
    assert_quiet_log(sd)


def test_rpull_busybox_opt_runs_a_container_lazily(logged_registry, lazy_stack, shared):
    """The Go-optimized busybox ``opt`` tag (``.prefetch.landmark``, workload files first) is
    lazily pulled (FUSE-mounted, blob not in containerd's content store) and a container
    runs its recorded workload from it, printing what the plain ``1`` tag holds: the
    greeting, then every name under /bin."""
    sd, c = lazy_stack(NO_BACKGROUND)
    layout = shared / "fixtures" / "oci-busybox"
    ref = logged_registry.push_oci(layout, "opt", "busybox:opt")
    rpull(c, ref)
    assert_lazily_mounted(sd, c, layers_of(layout, "opt"))
    out = ctr_run(c, ref, "bb-opt", *BUSYBOX_WORKLOAD)
    assert out == busybox_expected_output(shared)
    assert_quiet_log(sd)


def test_rpull_of_a_plain_gzip_image_falls_back_to_unpacking(logged_registry, lazy_stack, shared):
    """Lazy pulling on, but ``oci-corners:orig`` is plain tar+gzip (no TOC digest label):
    the daemon refuses to mount each layer remotely, logs one warning per layer with
    ``remote-snapshot-prepared=false`` and the reason, answers with normal mounts, and
    containerd downloads (the blobs are in its content store) and unpacks them: nothing is
    FUSE-mounted, and the rootfs equals the ground truth."""
    sd, c = lazy_stack(NO_BACKGROUND)
    layout = shared / "fixtures" / "oci-corners"
    layers = layers_of(layout, "orig")
    ref = logged_registry.push_oci(layout, "orig", "corners:orig")
    rpull(c, ref)
    refused = [r for r in sd.log_records() if "remote-snapshot-prepared" in r]
    assert [(r["level"], r["remote-snapshot-prepared"]) for r in refused] == [
        ("warning", "false")
    ] * len(layers)
    assert all("toc.digest" in str(r["error"]) for r in refused), refused
    assert mounts_under(Path(sd.root) / "snapshots") == {}
    content = set(c.ctr("content", "ls", "-q", ns=NS).stdout.split())
    assert {d["digest"] for d in layers} <= content
    with mounted_image(c, ref, NS) as root:
        got = tree_listing(root)
    assert got == ground_truth(shared)
    assert sd.alive()


# --- 2. a container starts after a small fraction of the image is fetched ---------------


def test_container_starts_having_fetched_a_small_fraction(logged_registry, lazy_stack, shared):
    """Background fetch off: when a container of busybox ``opt`` + ``oci-corners:esgz``
    (3 layers, 6.5 MB of blobs) has run ``cat /etc/greeting /data/xattr-file; ls /bin``,
    the registry has served:

    - of the 5.45 MB corners layer, which the workload touches for two tiny files: at most
      a 1-byte connectivity probe, the 64 KiB footer+TOC tail, and the on-demand range(s)
      of those files, each widened to ``[blob] chunk_size`` (50 000 B) and so at most
      2 x 50 000 B (the widened range plus the member it ends in); asserted < 10 % of it
      (no prefetch: its ``.no.prefetch.landmark`` overrides rpull's 10 MiB prefetch label);
    - of the busybox layer, at most probe + tail + its prefetch region (up to its
      ``.prefetch.landmark``: the workload's files, i.e. the busybox binary, most of it);
    - in total < 25 % of the image's layer bytes (about 19 % today: the busybox binary the
      shell needs is 16 % of the image).
    """
    sd, c = lazy_stack(NO_BACKGROUND)
    fixtures = shared / "fixtures"
    layout = stack_images(
        sd.workdir / "stack",
        "1",
        [(fixtures / "oci-busybox", "opt"), (fixtures / "oci-corners", "esgz")],
    )
    layers = layers_of(layout, "1")
    busybox, big, small = layers
    ref = logged_registry.push_oci(layout, "1", "stack:1")
    rpull(c, ref)
    assert_lazily_mounted(sd, c, layers)
    out = ctr_run(
        c, ref, "small-fraction", "sh", "-c", "cat /etc/greeting /data/xattr-file; ls /bin"
    )
    corners = tar_files(shared, "oci-corners", "orig")
    names = sorted({*busybox_bin(shared), "setuid-tool"})  # /bin of both images, merged
    want = corners["etc/greeting"] + corners["data/xattr-file"]
    assert out.encode() == want + "".join(f"{n}\n" for n in names).encode()
    served = {d["digest"]: logged_registry.blob_bytes(d["digest"]) for d in layers}

    after_pull = 1 + TAIL
    # its first two GETs open it (the probe, which brings the blob's last bytes, then the
    # rest of its 16 KB footer+TOC tail); 1-byte GETs are connectivity checks
    gets = [r.size for r in logged_registry.blob_requests(big["digest"]) if r.method == "GET"]
    on_demand = [n for n in gets[2:] if n != 1]
    assert len(on_demand) <= 2 and all(n <= 2 * CHUNK_SIZE for n in on_demand), on_demand
    assert served[big["digest"]] <= after_pull + 2 * 2 * CHUNK_SIZE, served
    assert served[big["digest"]] < 0.10 * big["size"], served

    blob = fixtures / "oci-busybox" / "blobs" / "sha256" / busybox["digest"].split(":")[1]
    with open_file(str(blob)) as r:
        prefetch = r.prefetch_size
    assert prefetch is not None and 0 < prefetch < busybox["size"]
    assert served[busybox["digest"]] <= after_pull + prefetch, (served, prefetch)
    assert served[small["digest"]] <= 1 + small["size"] * 2, served
    total = sum(d["size"] for d in layers)
    assert sum(served.values()) < 0.25 * total, (served, total)
    assert_quiet_log(sd)


# --- 3. images our converter made -------------------------------------------------------


@pytest.mark.parametrize("flags", [(), ("--zstdchunked",)], ids=["gzip", "zstdchunked"])
def test_our_converted_corners_lazily_pulled_to_the_ground_truth(
    flags, logged_registry, lazy_stack, shared, tmp_path
):
    """``stargz convert oci:<corners>:orig oci:<corners>:ours`` (gzip eStargz, and with
    ``--zstdchunked``) gives an image that Go's ``ctr-remote i rpull`` lazily pulls through
    our daemon (every layer FUSE-mounted, blobs not in the content store) and whose merged
    rootfs equals the ground truth exactly."""
    sd, c = lazy_stack(NO_BACKGROUND)
    layout = writable_copy(shared / "fixtures" / "oci-corners", tmp_path / "corners")
    convert(layout, "orig", "ours", *flags)
    layers = layers_of(layout, "ours")
    assert len(layers) == 2
    for d in layers:
        assert d["annotations"]["containerd.io/snapshot/stargz/toc.digest"].startswith("sha256:")
    ref = logged_registry.push_oci(layout, "ours", "corners:ours")
    rpull(c, ref)
    assert_lazily_mounted(sd, c, layers)
    with mounted_image(c, ref, NS) as root:
        got = tree_listing(root)
    assert got == ground_truth(shared)
    assert_quiet_log(sd)


def test_our_converted_busybox_runs_lazily(logged_registry, lazy_stack, shared, tmp_path):
    """busybox ``1`` converted by our ``stargz convert`` is lazily pulled by rpull and a
    container runs ``cat /etc/greeting; ls /bin`` from it with the expected output."""
    sd, c = lazy_stack(NO_BACKGROUND)
    layout = writable_copy(shared / "fixtures" / "oci-busybox", tmp_path / "busybox")
    convert(layout, "1", "ours")
    ref = logged_registry.push_oci(layout, "ours", "busybox:ours")
    rpull(c, ref)
    assert_lazily_mounted(sd, c, layers_of(layout, "ours"))
    assert ctr_run(c, ref, "bb-ours", *BUSYBOX_WORKLOAD) == busybox_expected_output(shared)
    assert_quiet_log(sd)


# --- 4. a corrupted chunk in the registry --------------------------------------------------


def test_flipped_byte_in_a_chunk_fails_only_that_chunk_with_eio(
    logged_registry, lazy_stack, shared, tmp_path
):
    """One byte flipped inside the compressed data of one 64 KiB chunk of
    ``data/noise.bin`` (the big layer of ``oci-corners:esgz-64k``), pushed as a new image
    (blob, manifest digests fixed up so the registry accepts it; the TOC and its digest are
    intact, so the layer mounts, and containerd never reads the lazily served blob):

    - ``cat data/noise.bin`` fails with "Input/output error", and a direct 4 KiB read in that
      chunk fails with EIO, twice: the bad chunk is never cached, each read fetches it again;
    - a direct read of another chunk of the same file returns the right bytes, and every
      other regular file has the ground truth's sha256;
    - the daemon logs the verification failure for that path, keeps running, and answers a
      later List RPC and another file read.
    """
    sd, c = lazy_stack(NO_BACKGROUND)
    layout = writable_copy(shared / "fixtures" / "oci-corners", tmp_path / "corners")
    big = layers_of(layout, "esgz-64k")[0]["digest"]
    blob_path = layout / "blobs" / "sha256" / big.split(":")[1]
    with open_file(str(blob_path)) as r:
        node = r.lookup("data/noise.bin")
        lo, hi = r.chunks.span(node.id)
        assert hi - lo > 8
        bad, good = r.chunks.row(lo + 3), r.chunks.row(lo + 6)
        next_member = r.chunks.row(lo + 4)[1]
        good_bytes = r.read(node.id, good[0], 4096)
    bad_file_off, bad_start = bad[0], bad[1]
    blob = bytearray(blob_path.read_bytes())
    blob[(bad_start + next_member) // 2] ^= 0x01
    flipped = replace_layer(layout, "esgz-64k", big, bytes(blob), "flipped")
    ref = logged_registry.push_oci(layout, "flipped", "corners:flipped")
    rpull(c, ref)
    assert prepared_flags(sd) == ["true", "true"]

    truth = ground_truth(shared)["entries"]
    with mounted_image(c, ref, NS) as root:
        noise = root / "data" / "noise.bin"
        p = subprocess.run(["cat", str(noise)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert p.returncode != 0 and b"Input/output error" in p.stderr, p
        for _ in range(2):
            gets = len(logged_registry.blob_requests(flipped))
            with pytest.raises(OSError) as e:
                pread_direct(noise, bad_file_off)
            assert e.value.errno == errno.EIO
            # fetched again (the registry logs a request just after answering it)
            poll("a refetch", lambda n=gets: len(logged_registry.blob_requests(flipped)) > n, 10)
        assert pread_direct(noise, good[0]) == good_bytes
        for path, want in truth.items():
            if want["type"] == 8 and path != "data/noise.bin":  # regular files
                got = hashlib.sha256((root / path).read_bytes()).hexdigest()
                assert got == want["sha256"], path

        assert sd.alive()
        remote = [i for i in daemon_list(sd) if "containerd.io/snapshot/remote" in i.labels]
        assert len(remote) == 2
        unicode_name = root / "data" / "ünïcødé name with spaces.txt"
        want = truth["data/ünïcødé name with spaces.txt"]["sha256"]
        assert hashlib.sha256(unicode_name.read_bytes()).hexdigest() == want
    failures = [r for r in sd.log_records() if r["msg"] == "chunk failed verification, not served"]
    assert failures and {r["path"] for r in failures} == {"data/noise.bin"}
    assert {r["layer"] for r in failures} == {flipped}


# --- 5. the registry goes away after a full fetch ----------------------------------------


def test_every_file_readable_after_registry_stops_once_fully_fetched(
    logged_registry, lazy_stack, shared
):
    """Background fetch on (the default): after rpull of ``oci-corners:esgz-64k`` the
    daemon fetches both layers completely, which each layer's state file
    ``/.stargz-snapshotter/<digest>.json`` reports as ``fetchedPercent`` 100 (polled, with a
    deadline; background fetch starts after a 5 s quiet period). Then the registry is
    stopped, and a new view of the image (whose Mounts checks the layers' availability)
    still reads every file with the ground truth's content, mode and owner."""
    sd, c = lazy_stack("")
    layout = shared / "fixtures" / "oci-corners"
    layers = layers_of(layout, "esgz-64k")
    ref = logged_registry.push_oci(layout, "esgz-64k", "corners:esgz-64k")
    rpull(c, ref)
    assert_lazily_mounted(sd, c, layers)
    dirs = remote_layer_dirs(sd)

    def states() -> dict[str, dict[str, Any]]:
        return {
            d: json.loads((mp / ".stargz-snapshotter" / f"{d}.json").read_text())
            for d, mp in dirs.items()
        }

    poll("a full fetch", lambda: all(s["fetchedPercent"] == 100 for s in states().values()), 90)
    for d in layers:
        assert states()[d["digest"]] == {
            "digest": d["digest"],
            "size": d["size"],
            "fetchedSize": d["size"],
            "fetchedPercent": 100,
        }
        # everything came from the registry: the whole blob was served, but for the tar
        # headers before its first chunk (85 B here: no chunk holds them, none reads them)
        assert logged_registry.blob_bytes(d["digest"]) >= d["size"] - 4096

    logged_registry.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{logged_registry.host}/v2/", timeout=2)
    with mounted_image(c, ref, NS) as root:
        got = tree_listing(root)
    assert got == ground_truth(shared)
    assert sd.alive()
    assert_quiet_log(sd)


# --- 6. kill -9 and restart -----------------------------------------------------------------


def test_kill9_restart_remounts_and_does_not_refetch_cached_chunks(
    logged_registry, lazy_stack, shared
):
    """Background fetch off, and no keeper of the FUSE connection (``--fuse-handover off``:
    the path a first start, a holder that is gone or a reboot takes; with a keeper, see
    test_restart.py). A container of busybox ``opt`` + ``oci-corners:esgz`` reads
    the greeting and the whole 5.2 MB incompressible ``/data/noise.bin`` (so the busybox
    prefetch region, ~1 MB, and noise.bin's chunks, ~5.2 MB, are in the disk cache). Then
    the daemon is killed with SIGKILL (its FUSE mounts die with it) and restarted on the same
    root:

    - every remote snapshot is mounted again: each layer's ``fs`` dir, dead right after the
      kill (ENOTCONN), is again a ``fuse.stargz`` mount of that layer's subtree, and answers;
    - once containerd has reconnected, a new container runs the same command from those
      snapshots, with the same output;
    - no cached chunk is fetched again: after the restart the registry served each blob at
      most a 1-byte probe and a footer+TOC tail (1 B + 64 KiB; today only the probe), far
      below what re-reading the busybox prefetch or noise.bin's chunks would cost.
    """
    sd, c = lazy_stack(NO_BACKGROUND, ("--fuse-handover", "off"))
    fixtures = shared / "fixtures"
    layout = stack_images(
        sd.workdir / "stack",
        "1",
        [(fixtures / "oci-busybox", "opt"), (fixtures / "oci-corners", "esgz")],
    )
    layers = layers_of(layout, "1")
    ref = logged_registry.push_oci(layout, "1", "stack:1")
    rpull(c, ref)
    assert_lazily_mounted(sd, c, layers)
    cmd = ("sh", "-c", "cat /etc/greeting; sha256sum /data/noise.bin")
    first = ctr_run(c, ref, "before-kill", *cmd)
    noise_sha = ground_truth(shared)["entries"]["data/noise.bin"]["sha256"]
    assert first.split()[-2:] == [noise_sha, "/data/noise.bin"], first
    before = {d["digest"]: logged_registry.blob_bytes(d["digest"]) for d in layers}
    n_requests = len(logged_registry.blob_requests())
    old_mounts = mounts_under(Path(sd.root) / "snapshots")
    assert len(old_mounts) == 3
    # the reads were answered before their chunks reached the disk cache: let the cache
    # writer finish (the state files count committed chunks only) before the kill, so
    # what must not be fetched again is really cached
    dirs = remote_layer_dirs(sd)

    def cached() -> tuple[int, ...]:
        return tuple(
            json.loads((mp / ".stargz-snapshotter" / f"{d}.json").read_text())["fetchedSize"]
            for d, mp in sorted(dirs.items())
        )

    seen = [cached()]

    def settled() -> bool:
        time.sleep(0.4)
        seen.append(cached())
        return seen[-1] == seen[-2]

    poll("the cache writes to land", settled, 30)

    sd.kill9()
    for mp in old_mounts:  # the FUSE connection died with the daemon
        with pytest.raises(OSError) as e:
            os.listdir(mp)
        assert e.value.errno == errno.ENOTCONN
    sd.restart()
    new_mounts = mounts_under(Path(sd.root) / "snapshots")
    assert {mp: (m.fstype, m.root) for mp, m in new_mounts.items()} == {
        mp: ("fuse.stargz", m.root) for mp, m in old_mounts.items()
    }
    for mp in new_mounts:
        assert os.listdir(mp), mp  # mounted again, and answering

    def reconnected() -> bool:
        return c.ctr("snapshots", *SNAP, "ls", ns=NS, check=False).returncode == 0

    poll("containerd to reconnect to the restarted daemon", reconnected, 30)
    assert ctr_run(c, ref, "after-restart", *cmd) == first

    after = logged_registry.blob_requests()[n_requests:]
    assert all(r.size <= TAIL for r in after), after
    for d in layers:
        refetched = logged_registry.blob_bytes(d["digest"]) - before[d["digest"]]
        assert refetched <= 1 + TAIL, (d["digest"], refetched, after)
    # ... and the test can tell: what the first container made the daemon fetch of each
    # of the two big layers is far more than that allowance
    for d in layers[:2]:
        assert before[d["digest"]] > 4 * (1 + TAIL), before
    restored = [r for r in sd.log_records() if r["msg"] == "layer mounted"]
    assert len(restored) == 2 * 3  # 3 mounts at rpull, 3 again at restart
    assert prepared_flags(sd) == ["true"] * 3
    assert not [r for r in sd.log_records() if r["level"] in ("error", "critical")]
