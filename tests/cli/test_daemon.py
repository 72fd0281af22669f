"""The ``containerd-stargz-grpc`` process: command line, config errors, socket, signals, logs."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from harness.procs import REPO, StargzDaemon, make_tempdir

from stargz.service.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb

#: Lazy pulling off: these tests are about the daemon process, not the filesystem.
NO_LAZY = ["--no-lazy"]


def daemon_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stargz.cli.daemon", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO / "src")),
    )


@pytest.fixture
def workdir():
    d = make_tempdir("sgz-t-")
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


def test_config_error_exits_2_with_one_line_naming_the_key(workdir):
    cfg = workdir / "config.toml"
    cfg.write_text("[blob]\nchunk_size = 'big'\n")
    p = daemon_cmd(
        "--config", str(cfg), "--root", str(workdir / "r"), "--address", str(workdir / "s.sock")
    )
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "blob.chunk_size" in lines[0], p.stderr
    assert not (workdir / "s.sock").exists()

    cfg.write_text("no_prefetch = true\n")
    p = daemon_cmd("--config", str(cfg), "--root", str(workdir / "r"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and '"no_prefetch"' in p.stderr


def test_missing_explicit_config_file_exits_2(workdir):
    p = daemon_cmd("--config", str(workdir / "nope.toml"), "--root", str(workdir / "r"))
    assert p.returncode == 2 and "nope.toml" in p.stderr


def test_bad_flag_exits_2():
    p = daemon_cmd("--log-level", "loud")
    assert p.returncode == 2


def test_version():
    p = daemon_cmd("--version")
    assert p.returncode == 0 and "containerd-stargz-grpc" in p.stdout


def test_socket_and_directory_permissions():
    d = StargzDaemon.start(extra_args=NO_LAZY)
    try:
        sock = Path(d.address)
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    finally:
        d.close()


def test_an_existing_socket_directory_keeps_its_mode(workdir):
    shared_run = workdir / "run"
    shared_run.mkdir(mode=0o755)
    shared_run.chmod(0o755)
    d = StargzDaemon.start(workdir, address=str(shared_run / "s.sock"), extra_args=NO_LAZY)
    try:
        assert stat.S_IMODE(shared_run.stat().st_mode) == 0o755
        assert stat.S_IMODE(os.stat(d.address).st_mode) == 0o600
    finally:
        d.close()


def test_logs_are_json_lines_with_structured_fields():
    d = StargzDaemon.start(extra_args=NO_LAZY)
    try:
        with d.channel() as ch:
            d.stub(ch).Prepare(
                pb.PrepareSnapshotRequest(key="k1", labels={"containerd.io/snapshot.ref": "t"}),
                metadata=(("containerd-namespace", "logs"),),
            )
    finally:
        d.close()  # flushes the log
    lines = [ln for ln in d.log_text().splitlines() if ln.strip()]
    recs = [json.loads(ln) for ln in lines]  # every line is JSON
    assert all({"time", "level", "msg"} <= r.keys() for r in recs)
    assert any(r.get("remote-snapshot-prepared") == "false" and r.get("key") == "k1" for r in recs)
    rpc = [r for r in recs if r["msg"] == "rpc" and r.get("method") == "Prepare"]
    assert rpc and rpc[0]["namespace"] == "logs" and rpc[0]["code"] == "OK"
    assert not [r for r in recs if r["level"] in ("warning", "error", "fatal")]


def test_text_log_format():
    d = StargzDaemon.start(extra_args=["--log-format", "text", *NO_LAZY])
    d.close()
    assert 'level=info msg="serving"' in d.log_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_stop_signal_finishes_in_flight_calls_and_exits_0(sig):
    d = StargzDaemon.start(extra_args=NO_LAZY)
    try:
        # An orphan tree big enough that Cleanup (removing it) takes a while; hard links,
        # because creating new inodes is slow on some disks.
        orphan = Path(d.root, "snapshots", "424242", "fs")
        orphan.mkdir(parents=True)
        (orphan / "src").write_bytes(b"")
        for i in range(200):
            sub = orphan / f"d{i}"
            sub.mkdir()
            for j in range(100):
                os.link(orphan / "src", sub / f"f{j}")
        result: dict[str, object] = {}

        def cleanup() -> None:
            with d.channel() as ch:
                try:
                    d.stub(ch).Cleanup(pb.CleanupRequest(), timeout=60)
                    result["ok"] = True
                except grpc.RpcError as e:
                    result["error"] = e

        t = threading.Thread(target=cleanup)
        t.start()
        deadline = time.monotonic() + 20
        while len(os.listdir(orphan)) == 201 and time.monotonic() < deadline:
            time.sleep(0.0005)  # until the removal has started
        os.kill(d.pid, sig)
        t.join(60)
        assert result == {"ok": True}
        assert d.proc is not None and d.proc.wait(30) == 0
        assert not Path(d.root, "snapshots", "424242").exists()
        assert not Path(d.address).exists()
        msgs = [(r["msg"], r.get("method")) for r in d.log_records()]
        # the signal arrived while Cleanup was running, and Cleanup still completed
        assert msgs.index(("shutting down", None)) < msgs.index(("rpc", "Cleanup"))
        assert msgs[-1] == ("stopped", None)
    finally:
        d.close()


def test_state_survives_a_restart():
    d = StargzDaemon.start(extra_args=NO_LAZY)
    md = (("containerd-namespace", "k8s.io"),)
    try:
        with d.channel() as ch:
            s = d.stub(ch)
            s.Prepare(pb.PrepareSnapshotRequest(key="a"), metadata=md)
            s.Commit(pb.CommitSnapshotRequest(key="a", name="A", labels={"l": "v"}), metadata=md)
        d.restart()
        with d.channel() as ch:
            # found without the metadata it was made with: one key space
            info = d.stub(ch).Stat(pb.StatSnapshotRequest(key="A")).info
        assert (info.name, info.kind, dict(info.labels)) == ("A", pb.COMMITTED, {"l": "v"})
    finally:
        d.close()


def test_stale_socket_is_replaced_but_a_live_one_is_not_taken():
    d = StargzDaemon.start(extra_args=NO_LAZY)
    try:
        d.kill9()  # leaves the socket file behind
        assert Path(d.address).exists()
        d.restart()  # a stale socket: replaced
        p = daemon_cmd("--address", d.address, "--root", d.root + "-2", "--config", "/dev/null")
        assert p.returncode == 1 and "in use" in p.stderr
        with d.channel() as ch:  # the first daemon still serves
            list(d.stub(ch).List(pb.ListSnapshotsRequest(), timeout=5))
    finally:
        d.close()


def test_systemd_notify_ready_once_serving(workdir):
    notify = workdir / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(str(notify))
        rx.settimeout(30)
        address = workdir / "run" / "s.sock"
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stargz.cli.daemon",
                "--address",
                str(address),
                "--root",
                str(workdir / "root"),
                "--config",
                "/dev/null",
                "--log-level",
                "error",
            ],
            env=dict(os.environ, PYTHONPATH=str(REPO / "src"), NOTIFY_SOCKET=str(notify)),
        )
        try:
            assert rx.recv(64) == b"READY=1"
            with grpc.insecure_channel(f"unix:{address}") as ch:  # already serving
                grpc.channel_ready_future(ch).result(timeout=5)
            p.send_signal(signal.SIGTERM)
            assert rx.recv(64) == b"STOPPING=1"
            assert p.wait(30) == 0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_cri_keychain_serves_the_image_service_and_survives_containerd_being_away(workdir):
    """``[cri_keychain] enable_keychain``: the CRI ImageService answers on the
    snapshotter's socket with no "not implemented" warning; with containerd's socket
    absent a call gets ``UNAVAILABLE`` (no crash: the next call is served too), and a
    malformed ``auth`` gets ``INVALID_ARGUMENT`` before anything is forwarded."""
    from harness.cri import CRIClient, cri

    backend = workdir / "no-containerd.sock"
    d = StargzDaemon.start(
        config_text=f'[cri_keychain]\nenable_keychain = true\nimage_service_path = "{backend}"\n',
        extra_args=NO_LAZY,
    )
    try:
        with CRIClient(d.address, timeout=10) as kubelet:
            for _ in range(2):
                with pytest.raises(grpc.RpcError) as e:
                    kubelet.list_images()
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.RpcError) as e:
                kubelet.pull("127.0.0.1:1/a:b", auth=cri.AuthConfig(auth="not base64!"))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details() == "PullImage: auth.auth is not base64"
        assert d.alive()
    finally:
        d.close()
    recs = d.log_records()
    serving = [r for r in recs if r["msg"] == "serving the CRI image service"]
    assert serving and serving[0]["address"] == d.address
    assert serving[0]["backend"] == str(backend)
    assert not [r for r in recs if "not implemented" in r["msg"]]
    assert not [r for r in recs if r["level"] in ("error", "fatal")]
