"""``stargz optimize``: a real workload run by real runc on the image's layers mounted
through our FUSE filesystem and kernel overlayfs; what it opened comes first in each layer.

Ground truth: the files a workload reads are known (it names them), Go's ``ctr-remote i
optimize`` made the busybox fixture's ``opt`` tag from the same workload (its prioritized
files are the reference list), each output layer must hold exactly the files of the layer
it came from (our reader and Go's ``esgz-verify``), and the merged tree of a stacked image
must equal the overlayfs ground truth of the corners fixture.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from harness.oci import build_image, find_manifest

from stargz import mountinfo
from stargz.estargz import open_file
from stargz.estargz.toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK

REPO = Path(__file__).resolve().parents[2]
TOC = "containerd.io/snapshot/stargz/toc.digest"
WORKLOAD = ["--entrypoint", '["/bin/sh","-c"]', "--args", '["cat /etc/greeting; ls /bin"]']

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def sandbox_host() -> None:
    """Fail (never skip) with the reason when this host can't run the sandbox."""
    if os.geteuid() != 0:
        pytest.fail("stargz optimize needs root (FUSE, overlay mounts, runc)", pytrace=False)
    if not os.path.exists("/dev/fuse"):
        pytest.fail("/dev/fuse is missing (modprobe fuse)", pytrace=False)
    if shutil.which("runc") is None:
        pytest.fail("runc is not installed (apt-get install runc)", pytrace=False)


def writable_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    return dst


def stargz(*args: str, env: dict[str, str] | None = None, timeout: float = 240):
    """The ``stargz`` CLI of this checkout, in a child process."""
    base = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{REPO / 'tests'}"}
    return subprocess.run(
        [sys.executable, "-m", "stargz.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, **(env or {})},
    )


def layer_paths(layout: Path, tag: str) -> list[Path]:
    man = find_manifest(layout, tag)
    return [layout / "blobs" / "sha256" / d["digest"].split(":")[1] for d in man["layers"]]  # type: ignore[index]


def toc_order(blob: Path) -> list[str]:
    with open_file(str(blob)) as r:
        return [e.name for e in r.toc.entries]


def prioritized(blob: Path) -> list[str] | None:
    """Regular files before the landmark (None: the layer has ``.no.prefetch.landmark``)."""
    with open_file(str(blob)) as r:
        names = [e.name for e in r.toc.entries]
        types = {e.name: e.type for e in r.toc.entries}
    if NO_PREFETCH_LANDMARK in names:
        return None
    assert PREFETCH_LANDMARK in names, names
    return [n for n in names[: names.index(PREFETCH_LANDMARK)] if types[n] == "reg"]


def no_sandbox_mounts() -> list[str]:
    return [mp for mp in mountinfo.mount_points() if "stargz-optimize-" in mp]


@pytest.fixture
def busybox_copy(shared_dir: Path, tmp_path: Path) -> Path:
    return writable_copy(shared_dir / "fixtures" / "oci-busybox", tmp_path / "busybox")


def test_busybox_workload_files_come_first_as_go_orders_them(
    busybox_copy, tmp_path, esgz_verify, trees
):
    """``cat /etc/greeting; ls /bin`` on busybox ``1``: the layer starts with what the shell
    and cat opened (bin/busybox, then etc/greeting), then ``.prefetch.landmark`` -- the
    same list, in the same order, as Go's ``ctr-remote i optimize`` wrote into ``opt``.
    The record has Go's fields; Go's reader accepts the layer; no file was lost or changed;
    nothing stays mounted."""
    rec = tmp_path / "record.json"
    p = stargz(
        "optimize",
        *WORKLOAD,
        "--record-out",
        str(rec),
        f"oci:{busybox_copy}:1",
        f"oci:{busybox_copy}:ours",
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("hi\n")  # the workload's own output is passed through
    assert "busybox\ncat\necho\nls\nsh\nsleep\n" in p.stdout
    (ours,) = layer_paths(busybox_copy, "ours")
    (go,) = layer_paths(busybox_copy, "opt")
    (src,) = layer_paths(busybox_copy, "1")
    print("prefetch (ours):", prioritized(ours), " (Go ctr-remote):", prioritized(go))
    assert prioritized(ours) == ["bin/busybox", "etc/greeting"]
    assert prioritized(ours) == prioritized(go)
    order = toc_order(ours)
    assert order[: order.index(PREFETCH_LANDMARK) + 1] == [
        "",
        "bin",
        "bin/busybox",
        "etc",
        "etc/greeting",
        PREFETCH_LANDMARK,
    ]
    mdigest = find_manifest_digest(busybox_copy, "1")
    lines = [json.loads(x) for x in rec.read_text().splitlines()]
    assert lines == [
        {"path": "bin/busybox", "manifestDigest": mdigest, "layerIndex": 0},
        {"path": "etc/greeting", "manifestDigest": mdigest, "layerIndex": 0},
    ]
    desc = find_manifest(busybox_copy, "ours")["layers"][0]  # type: ignore[index]
    v = subprocess.run([str(esgz_verify), str(ours), desc["annotations"][TOC]], capture_output=True)
    assert v.returncode == 0, v.stderr
    with open_file(str(ours), toc_digest=desc["annotations"][TOC]) as r:
        trees.compare(trees.reader(r), trees.tar(src))
    assert no_sandbox_mounts() == []


def find_manifest_digest(layout: Path, tag: str) -> str:
    index = json.loads((layout / "index.json").read_text())
    return next(
        m["digest"]
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    )


@pytest.fixture
def stacked(shared_dir: Path, tmp_path: Path) -> Path:
    """busybox ``1`` (plain gzip), then a layer that replaces /etc/greeting, adds
    /etc/app.conf and whites out /bin/echo, then a layer nobody reads (/opt/unused)."""
    base = writable_copy(shared_dir / "fixtures" / "oci-busybox", tmp_path / "base")
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("etc/greeting", b"hello from the top\n"), ("etc/app.conf", b"x=1\n")):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o644
            tar.addfile(ti, io.BytesIO(data))
        ti = tarfile.TarInfo("bin/.wh.echo")
        tar.addfile(ti, io.BytesIO(b""))
    out = tmp_path / "stacked"
    build_image(out, "1", [buf.getvalue(), {"opt/unused": b"never read\n"}], base=(base, "1"))
    return out


def test_each_layer_gets_the_files_it_served_and_record_in_reproduces_it(
    stacked, tmp_path, esgz_verify, trees
):
    """Three layers: each file goes to the layer overlayfs read it from (the top one that
    has it: the replaced /etc/greeting is layer 1's, /bin/busybox layer 0's), a layer the
    workload never touched gets ``.no.prefetch.landmark``, and ``stargz convert
    --record-in`` with the record gives the same layers, byte for byte."""
    rec = tmp_path / "record.json"
    workload = "cat /etc/greeting /etc/app.conf; test ! -e /bin/echo && echo gone"
    p = stargz(
        "optimize",
        "--entrypoint",
        '["/bin/sh","-c"]',
        "--args",
        json.dumps([workload]),
        "--record-out",
        str(rec),
        f"oci:{stacked}:1",
        f"oci:{stacked}:opt",
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("hello from the top\nx=1\ngone\nsha256:")
    blobs = layer_paths(stacked, "opt")
    assert [prioritized(b) for b in blobs] == [
        ["bin/busybox"],
        ["etc/greeting", "etc/app.conf"],
        None,
    ]
    entries = [json.loads(x) for x in rec.read_text().splitlines()]
    assert [(e["path"], e["layerIndex"]) for e in entries] == [
        ("bin/busybox", 0),
        ("etc/greeting", 1),
        ("etc/app.conf", 1),
    ]
    descs = find_manifest(stacked, "opt")["layers"]  # type: ignore[index]
    for blob, src, desc in zip(blobs, layer_paths(stacked, "1"), descs, strict=True):
        v = subprocess.run(
            [str(esgz_verify), str(blob), desc["annotations"][TOC]], capture_output=True
        )
        assert v.returncode == 0, v.stderr
        with open_file(str(blob)) as r:
            trees.compare(trees.reader(r), trees.tar(src))
    c = stargz("convert", "-q", "--record-in", str(rec), f"oci:{stacked}:1", f"oci:{stacked}:rec")
    assert c.returncode == 0, c.stderr
    assert find_manifest(stacked, "rec")["layers"] == descs


def test_a_workload_that_fails_still_optimizes_with_a_warning(busybox_copy):
    p = stargz(
        "optimize",
        "--entrypoint",
        '["/bin/sh","-c"]',
        "--args",
        '["cat /etc/greeting; exit 3"]',
        f"oci:{busybox_copy}:1",
        f"oci:{busybox_copy}:ours",
    )
    assert p.returncode == 0, p.stderr
    assert "exited with status 3" in p.stderr
    (ours,) = layer_paths(busybox_copy, "ours")
    assert prioritized(ours) == ["bin/busybox", "etc/greeting"]


def test_a_workload_that_never_exits_is_stopped_after_the_period(busybox_copy):
    """``sleep 1000`` ignores nothing but would run forever: --period 2 stops it (SIGTERM,
    then SIGKILL: sh as pid 1 ignores SIGTERM) and the image is written."""
    t0 = time.monotonic()
    p = stargz(
        "optimize",
        "--period",
        "2",
        "--entrypoint",
        '["/bin/sh","-c"]',
        "--args",
        '["cat /etc/greeting; sleep 1000"]',
        f"oci:{busybox_copy}:1",
        f"oci:{busybox_copy}:ours",
    )
    took = time.monotonic() - t0
    assert p.returncode == 0, p.stderr
    assert "stopped after --period 2s" in p.stderr
    assert took < 60, took
    (ours,) = layer_paths(busybox_copy, "ours")
    assert prioritized(ours) == ["bin/busybox", "etc/greeting"]
    assert no_sandbox_mounts() == []


def test_missing_runc_is_a_one_line_error(busybox_copy, tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    p = stargz(
        "optimize",
        *WORKLOAD,
        f"oci:{busybox_copy}:1",
        f"oci:{busybox_copy}:ours",
        env={"PATH": str(empty)},
    )
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        "stargz: error: runc is not installed (not found on PATH): install runc"
    ]


def test_an_unknown_entrypoint_is_a_clear_error_and_leaves_nothing_mounted(busybox_copy):
    p = stargz(
        "optimize",
        "--entrypoint",
        '["/no/such/program"]',
        f"oci:{busybox_copy}:1",
        f"oci:{busybox_copy}:ours",
    )
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("stargz: error: ") and "/no/such/program" in last, p.stderr
    assert "Traceback" not in p.stderr
    assert no_sandbox_mounts() == []
    assert "ours" not in (busybox_copy / "index.json").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--entrypoint", "/bin/sh"], "--entrypoint must be a JSON array of strings"),
        (["--env", "NOVALUE"], "--env 'NOVALUE' must look like NAME=VALUE"),
        (["--period", "0"], "period must be positive"),
    ],
)
def test_bad_flags_are_one_line_errors(busybox_copy, args, message):
    p = stargz("optimize", *args, f"oci:{busybox_copy}:1", f"oci:{busybox_copy}:ours")
    assert p.returncode == 1
    assert len(p.stderr.strip().splitlines()) == 1 and message in p.stderr, p.stderr


def test_the_image_config_is_what_runs(shared_dir, tmp_path):
    """No flags: the image's Entrypoint + Cmd, Env, WorkingDir and User are used (a
    config made to show each), as containerd would run the image."""
    base = writable_copy(shared_dir / "fixtures" / "oci-busybox", tmp_path / "base")
    out = tmp_path / "cfg"
    build_image(
        out,
        "1",
        [{"etc/passwd": b"root:x:0:0::/root:/bin/sh\napp:x:1234:4321::/home/app:/bin/sh\n"}],
        base=(base, "1"),
    )
    # ids from /proc with shell builtins only: `id` would read /etc/passwd itself
    cmd = (
        "echo $GREETING $EXTRA from $(pwd); "
        "while read k v rest; do case $k in Uid:|Gid:) echo $k $v;; esac; done"
        " < /proc/self/status; cat greeting"
    )
    _patch_config(
        out,
        "1",
        {
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": [cmd],
            "Env": ["GREETING=hello"],
            "WorkingDir": "/etc",
        },
        user="app",
    )
    p = stargz("optimize", "--env", "EXTRA=1", f"oci:{out}:1", f"oci:{out}:opt")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[:4] == [
        "hello 1 from /etc",
        "Uid: 1234",
        "Gid: 4321",
        "hi",
    ]
    busybox, top = layer_paths(out, "opt")
    assert prioritized(busybox) == ["bin/busybox", "etc/greeting"]
    assert prioritized(top) is None  # /etc/passwd was read by the user lookup, not the workload


def _patch_config(layout: Path, tag: str, fields: dict[str, Any], user: str) -> None:
    """Rewrite the config of ``layout:tag`` with ``fields`` (and ``User``)."""
    import hashlib

    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    entry = next(
        m
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    )

    def put(doc: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(doc).encode()
        h = hashlib.sha256(data).hexdigest()
        (layout / "blobs" / "sha256" / h).write_bytes(data)
        return {"digest": f"sha256:{h}", "size": len(data)}

    man = find_manifest(layout, tag)
    cfg = json.loads(
        (layout / "blobs" / "sha256" / man["config"]["digest"].split(":")[1]).read_text()  # type: ignore[index]
    )
    cfg["config"] = {**cfg.get("config", {}), **fields, "User": user}
    man["config"] = {**man["config"], **put(cfg)}  # type: ignore[dict-item]
    entry.update(put(man))
    index_path.write_text(json.dumps(index))


def _interrupted_run(busybox_copy: Path, *flags: str) -> tuple[int, str]:
    """Run optimize on ``cat /etc/greeting; exec sleep 1000``, SIGINT it once the workload
    printed the greeting (mounts are up then); returns (exit status, stderr)."""
    base = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{REPO / 'tests'}"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stargz.cli.main",
            "optimize",
            *flags,
            "--entrypoint",
            '["/bin/sh","-c"]',
            "--args",
            '["cat /etc/greeting; exec sleep 1000"]',
            f"oci:{busybox_copy}:1",
            f"oci:{busybox_copy}:ours",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=base,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "hi\n"
        assert no_sandbox_mounts() != []
        proc.send_signal(2)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err
    assert no_sandbox_mounts() == []
    return proc.returncode, err


def test_ctrl_c_stops_the_workload_and_unmounts_everything(busybox_copy):
    """SIGINT while the workload runs: it is stopped, every mount goes, no image is
    written, exit status 130, and no traceback."""
    rc, err = _interrupted_run(busybox_copy, "--period", "120")
    assert rc == 130, err
    assert "ours" not in (busybox_copy / "index.json").read_text()


def test_wait_on_signal_runs_until_ctrl_c_then_optimizes(busybox_copy):
    """``--wait-on-signal``: no period; Ctrl-C ends the workload and the image is written
    with what it opened."""
    rc, err = _interrupted_run(busybox_copy, "--wait-on-signal", "--period", "1")
    assert rc == 0, err
    (ours,) = layer_paths(busybox_copy, "ours")
    assert prioritized(ours) == ["bin/busybox", "etc/greeting"]


def test_terminal_gives_the_workload_a_tty(busybox_copy):
    """``--terminal``: the workload's stdin and stdout are a terminal (runc's pty, whose
    master this process relays to its own stdio, here a pty too)."""
    import pty

    master, slave = pty.openpty()
    base = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{REPO / 'tests'}"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stargz.cli.main",
            "optimize",
            "--terminal",
            "--entrypoint",
            '["/bin/sh","-c"]',
            "--args",
            '["test -t 0 && test -t 1 && echo on-a-tty; cat /etc/greeting"]',
            f"oci:{busybox_copy}:1",
            f"oci:{busybox_copy}:ours",
        ],
        stdin=slave,
        stdout=slave,
        stderr=subprocess.PIPE,
        text=True,
        env=base,
    )
    os.close(slave)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(master, 65536):
            out += chunk
    os.close(master)
    assert proc.returncode == 0, err
    assert b"on-a-tty\r\nhi\r\n" in out, out
    (ours,) = layer_paths(busybox_copy, "ours")
    assert prioritized(ours) == ["bin/busybox", "etc/greeting"]


def _interfaces(text: str) -> set[str]:
    return {
        ln.split(":")[0].strip() for ln in text.splitlines() if ":" in ln and "sha256:" not in ln
    }


@pytest.mark.parametrize("net_host", [False, True], ids=["own-netns", "net-host"])
def test_network_namespace_is_the_containers_own_unless_net_host(busybox_copy, net_host):
    flags = ["--net-host"] if net_host else []
    p = stargz(
        "optimize",
        *flags,
        "--entrypoint",
        '["/bin/cat"]',
        "--args",
        '["/proc/net/dev"]',
        f"oci:{busybox_copy}:1",
        f"oci:{busybox_copy}:ours",
    )
    assert p.returncode == 0, p.stderr
    host = _interfaces(Path("/proc/net/dev").read_text())
    assert len(host) > 1
    assert _interfaces(p.stdout) == (host if net_host else {"lo"})
