"""``stargz status``: the daemon's ``stargz.v1.Status`` service read by the CLI.

Real processes throughout: our daemon with lazy pulling on, containerd 1.6 whose proxy
snapshotter it is, Go's ``ctr-remote i rpull`` (the client that asks for remote
snapshots), a real docker-registry, and ``python -m stargz.cli.main status`` as a child
process, exactly as an operator runs it.

- after a lazy pull, ``--json`` lists each layer of the image with its digest, reference,
  the snapshots (chain IDs) it backs, its size; its fetched % and cache misses grow after a
  file is read through the mount; the text output has one line per layer;
- a plain gzip image is refused layer by layer, each with its reason (and a plain layer
  offered with a TOC digest label says "not eStargz");
- a read that fails (registry gone) shows as the layer's last error;
- a socket nobody serves: exit status 1 and one line on stderr.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from harness.oci import find_manifest
from harness.procs import REPO, make_tempdir, run

from stargz.service.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb

pytestmark = [pytest.mark.timeout(180)]

NS = "status"
NO_BACKGROUND = "no_background_fetch = true\n"


def stargz_status(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stargz.cli.main", "status", "--address", address, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
    )


def status_json(address: str) -> dict[str, Any]:
    p = stargz_status(address, "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def rpull(c, ref: str) -> None:
    run(["ctr-remote", "-a", c.address, "-n", NS, "images", "rpull", "--plain-http", ref])


def chain_ids(layout: Path, tag: str) -> list[str]:
    """The chain ID of each layer of the image (the names of its committed snapshots)."""
    manifest = find_manifest(layout, tag)
    cfg_hex = manifest["config"]["digest"].split(":")[1]  # type: ignore[index]
    config = json.loads((layout / "blobs" / "sha256" / cfg_hex).read_bytes())
    out: list[str] = []
    for diff_id in config["rootfs"]["diff_ids"]:
        out.append(
            diff_id
            if not out
            else "sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest()
        )
    return out


def layer_digests(layout: Path, tag: str) -> list[str]:
    return [d["digest"] for d in find_manifest(layout, tag)["layers"]]  # type: ignore[index]


def largest_file(root: Path) -> Path:
    files = [Path(d) / f for d, _, names in os.walk(root) for f in names]
    regular = [p for p in files if p.is_file() and not p.is_symlink()]
    return max(regular, key=lambda p: p.stat().st_size)


def text_lines_per_layer(out: str, digests: list[str]) -> dict[str, list[str]]:
    return {d: [ln for ln in out.splitlines() if d[:19] in ln] for d in digests}


# --- a lazy pull --------------------------------------------------------------------------


def test_status_after_a_lazy_pull_lists_the_layers_and_fetched_grows(registry, lazy_stack, shared):
    """``oci-corners:esgz`` lazily pulled (background fetch off; the image's
    ``.no.prefetch.landmark`` means no prefetch): ``status --json`` lists exactly its
    layers, each with the pushed reference, the committed snapshot it backs (name = the
    layer's chain ID, mount point = a FUSE mount of that layer), its blob size and a
    fetched % below 100. Reading the largest file of the largest layer through the mount
    makes that layer's fetched % and cache misses grow. The text output then has a summary,
    a header, and one line per layer."""
    sd, c = lazy_stack(NO_BACKGROUND)
    layout = shared / "fixtures" / "oci-corners"
    ref = registry.push_oci(layout, "esgz", "status/corners:esgz")
    digests = layer_digests(layout, "esgz")
    sizes = {d["digest"]: d["size"] for d in find_manifest(layout, "esgz")["layers"]}  # type: ignore[index]
    rpull(c, ref)

    before = status_json(sd.address)
    assert before["daemon"]["lazy"] is True and before["daemon"]["pid"] == sd.pid
    assert before["refused"] == []
    layers = {x["digest"]: x for x in before["layers"]}
    assert sorted(layers) == sorted(digests)
    for d, chain in zip(digests, chain_ids(layout, "esgz"), strict=True):
        x = layers[d]
        assert x["ref"] == ref
        assert x["repository"] == ref.rsplit(":", 1)[0]
        assert x["size"] == sizes[d]
        assert [s["name"] for s in x["snapshots"]] == [chain]
        (mp,) = [s["mountpoint"] for s in x["snapshots"]]
        assert mp.startswith(os.path.join(sd.root, "snapshots", "")) and os.path.ismount(mp)
        assert 0 < x["fetched_size"] < x["size"] and 0 < x["fetched_percent"] < 100
        assert x["verification_failures"] == 0 and x["last_error"] is None

    big = max(digests, key=lambda d: sizes[d])
    path = largest_file(Path(layers[big]["snapshots"][0]["mountpoint"]))
    assert path.read_bytes()

    after = {x["digest"]: x for x in status_json(sd.address)["layers"]}
    assert after[big]["fetched_percent"] > layers[big]["fetched_percent"] + 10, (
        layers[big],
        after[big],
    )
    assert after[big]["fetched_size"] > layers[big]["fetched_size"]
    assert after[big]["cache_misses"] > layers[big]["cache_misses"]
    assert after[big]["last_error"] is None

    p = stargz_status(sd.address)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    lines = p.stdout.splitlines()
    assert lines[1].split()[:2] == ["LAYER", "REF"]
    assert len(lines) == 2 + len(digests), p.stdout
    for d, found in text_lines_per_layer(p.stdout, digests).items():
        assert len(found) == 1, (d, p.stdout)
        assert ref in found[0] and "lazy" in found[0]
    (big_line,) = text_lines_per_layer(p.stdout, [big])[big]
    (shown,) = re.findall(r"\s(\d+\.\d)%\s", big_line)
    # (>=: cache writes that finished since the JSON call count as fetched by now)
    assert float(shown) >= round(after[big]["fetched_percent"], 1), big_line


# --- refusals -------------------------------------------------------------------------------


def test_status_shows_why_layers_were_not_mounted_lazily(registry, lazy_stack, shared):
    """``oci-corners:orig`` is plain tar+gzip: rpull sends no TOC digest label, every layer
    is refused and unpacked by containerd, and ``status`` shows each under ``refused`` with
    reason ``no-toc-digest``, the layer digest, the reference and the target snapshot (its
    chain ID). A plain layer offered WITH a TOC digest label (as a Prepare can) is refused
    for having no eStargz footer: reason ``not-estargz``. Text: one line per layer, saying
    it was unpacked and why."""
    sd, c = lazy_stack(NO_BACKGROUND)
    layout = shared / "fixtures" / "oci-corners"
    ref = registry.push_oci(layout, "orig", "status/corners:orig")
    digests = layer_digests(layout, "orig")
    rpull(c, ref)

    doc = status_json(sd.address)
    assert doc["layers"] == []
    refused = {r["digest"]: r for r in doc["refused"]}
    assert sorted(refused) == sorted(digests)
    for d, chain in zip(digests, chain_ids(layout, "orig"), strict=True):
        r = refused[d]
        assert (r["reason"], r["ref"], r["snapshot"]) == ("no-toc-digest", ref, chain), r
        assert "not eStargz" in r["reason_text"] and "toc.digest" in r["error"]
        assert r["key"].endswith(chain) and r["count"] == 1
    assert doc["daemon"]["fallbacks"] == {"NoTOCDigest": len(digests)}

    # the same plain blob, offered with a TOC digest label: the blob has no eStargz footer
    chain = "sha256:" + "ef" * 32
    labels = {
        "containerd.io/snapshot.ref": chain,
        "containerd.io/snapshot/remote/stargz.reference": ref,
        "containerd.io/snapshot/remote/stargz.digest": digests[0],
        "containerd.io/snapshot/stargz/toc.digest": "sha256:" + "12" * 32,
    }
    with sd.channel() as ch:
        sd.stub(ch).Prepare(
            pb.PrepareSnapshotRequest(key=f"extract-x {chain}", labels=labels),
            metadata=(("containerd-namespace", NS),),
            timeout=60,
        )  # a normal (not remote) snapshot: no ALREADY_EXISTS
    (footer,) = [r for r in status_json(sd.address)["refused"] if r["snapshot"] == chain]
    assert footer["reason"] == "not-estargz" and footer["digest"] == digests[0], footer

    p = stargz_status(sd.address)
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == 2 + len(digests) + 1, p.stdout
    for d, found in text_lines_per_layer(p.stdout, digests).items():
        want = 2 if d == digests[0] else 1  # (the first layer was refused twice)
        assert len(found) == want, (d, p.stdout)
        assert all(ln.count("unpacked: ") == 1 for ln in found)
    assert sum("no TOC digest label" in ln for ln in p.stdout.splitlines()) == len(digests)
    assert sum("no eStargz footer" in ln for ln in p.stdout.splitlines()) == 1


# --- the last error -------------------------------------------------------------------------


def test_a_failed_read_is_the_layers_last_error(logged_registry, lazy_stack, shared):
    """Lazily pulled, nothing read yet; the registry stops; a read of a file whose chunks
    are not cached fails (EIO). ``status`` then shows, for that layer only, a read error
    and a last error naming the file, with its time; the other layer's stays empty."""
    sd, c = lazy_stack(NO_BACKGROUND)
    layout = shared / "fixtures" / "oci-corners"
    ref = logged_registry.push_oci(layout, "esgz", "status/corners:esgz")
    rpull(c, ref)
    layers = {x["digest"]: x for x in status_json(sd.address)["layers"]}
    big = max(layers, key=lambda d: layers[d]["size"])
    path = largest_file(Path(layers[big]["snapshots"][0]["mountpoint"]))

    logged_registry.stop()
    with pytest.raises(OSError):
        path.read_bytes()

    after = {x["digest"]: x for x in status_json(sd.address)["layers"]}
    x = after[big]
    assert x["read_errors"] > 0
    assert x["last_error"] and path.name in x["last_error"], x
    assert "?" not in x["last_error"]  # (a URL's query would be redacted to ?REDACTED)
    assert x["last_error_time"] > 0
    assert [y["last_error"] for d, y in after.items() if d != big] == [None] * (len(after) - 1)

    p = stargz_status(sd.address)
    (line,) = text_lines_per_layer(p.stdout, [big])[big]
    assert "last error" in line and path.name in line


# --- no daemon ------------------------------------------------------------------------------


@pytest.fixture
def workdir():
    d = make_tempdir("sgz-st-")
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


def test_no_daemon_is_one_line_and_a_failing_exit(workdir):
    """No socket at all, and a stale socket (left by a daemon that died: the file is there,
    nothing listens): exit status 1, nothing on stdout, one line on stderr naming the
    address and what is wrong, no traceback."""
    missing = workdir / "none.sock"
    stale = workdir / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))  # bound, never listening, then closed: the file stays
    for address, words in ((missing, "no such socket"), (stale, "nothing listens")):
        for args in ((), ("--json",)):
            p = stargz_status(str(address), *args)
            assert p.returncode == 1, p
            assert p.stdout == ""
            (line,) = p.stderr.splitlines()
            assert line.startswith("stargz: error: cannot reach the stargz daemon at ")
            assert str(address) in line and words in line, line


def test_a_daemon_without_lazy_pulling_says_so(snapshot_daemon):
    """``--no-lazy``: status answers, lazy is false, nothing mounted; a remote-snapshot
    Prepare is refused with reason ``lazy-disabled``."""
    chain = "sha256:" + "ab" * 32
    labels = {
        "containerd.io/snapshot.ref": chain,
        "containerd.io/snapshot/remote/stargz.reference": "example.com/a:b",
        "containerd.io/snapshot/remote/stargz.digest": "sha256:" + "cd" * 32,
    }
    with snapshot_daemon.channel() as ch:
        snapshot_daemon.stub(ch).Prepare(  # a normal snapshot: no ALREADY_EXISTS
            pb.PrepareSnapshotRequest(key=f"status-nolazy {chain}", labels=labels), timeout=30
        )
    doc = status_json(snapshot_daemon.address)
    assert doc["daemon"]["lazy"] is False and doc["layers"] == []
    (r,) = [r for r in doc["refused"] if r["snapshot"] == chain]
    assert (r["reason"], r["digest"], r["ref"]) == (
        "lazy-disabled",
        "sha256:" + "cd" * 32,
        "example.com/a:b",
    )
