"""The other side of the side-by-side benchmarks: the Go peer and the emulated network.

``GoDaemon`` runs the Go ``containerd-stargz-grpc`` that ``../shared/tools/go-peer/build.sh``
builds, so a benchmark can put it beside ours; :func:`netem` shapes the registry's port with
``../shared/tools/netem`` (delay + rate, MSS clamped, so TCP slow start counts);
:func:`registry_bytes` is what the registry sent, from its access log.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import time
from pathlib import Path

from tests.harness.procs import Daemon, Registry, make_tempdir, run, shared_dir

#: Where go-peer/build.sh puts the Go daemon by default.
GO_BIN = "/tmp/peer/bin/containerd-stargz-grpc"
#: Daemon config with prefetch and background fetch off (both daemons read these keys).
NO_FETCH = "noprefetch = true\nno_background_fetch = true\n"


class GoDaemon(Daemon):
    """The Go ``containerd-stargz-grpc`` built by ../shared/tools/go-peer/build.sh."""

    name = "go-stargz"

    @classmethod
    def start(cls, binary: str, registry_host: str, extra_toml: str = "") -> GoDaemon:
        self = cls(make_tempdir("sgz-go-"))
        (self.workdir / "run").mkdir()
        self.address = str(self.workdir / "run" / "stargz.sock")
        self.root = str(self.workdir / "root")
        cfg = self.workdir / "config.toml"
        cfg.write_text(
            extra_toml + f'root_path = "{self.root}"\naddress = "{self.address}"\n'
            f'[[resolver.host."{registry_host}".mirrors]]\n'
            f'host = "{registry_host}"\ninsecure = true\n'
        )
        self._launch([binary, "-config", str(cfg), "-log-level", "info"])
        return self

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.address)
        return True


def netem(action: str, port: int, delay_ms: float = 0, rate: str = "") -> None:
    """../shared/tools/netem on the registry port. netem.sh takes whole milliseconds; for a
    fractional one-way delay it is started with 1 ms and its delay program (the one it just
    started, by the pid it recorded) is replaced by the same binary with the delay in us."""
    peer = Path(os.environ.get("PEER_DIR", "/tmp/peer"))
    env = dict(
        os.environ,
        PEER_PORT=str(port),
        DELAY_MS=str(max(1, round(delay_ms))) if delay_ms else "0",
        RATE=rate or "1000mbit",
        PEER_DIR=str(peer),
    )
    run(["bash", str(shared_dir() / "tools" / "netem" / "netem.sh"), action], env=env, timeout=300)
    if action == "on" and delay_ms and delay_ms != round(delay_ms):
        pidf = peer / "netem-delay.pid"
        old = int(pidf.read_text())
        os.kill(old, 15)
        for _ in range(50):
            if not Path(f"/proc/{old}").exists():
                break
            time.sleep(0.1)
        with open(peer / "netem-delay.log", "ab") as lg:
            p = subprocess.Popen(
                [
                    "chrt",
                    "-f",
                    "20",
                    str(peer / "bin" / "nfq-delay"),
                    os.environ.get("QNUM", "5001"),
                    str(int(delay_ms * 1000)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=lg,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        pidf.write_text(f"{p.pid}\n")
        time.sleep(0.3)
        if p.poll() is not None:
            raise RuntimeError("nfq-delay did not start; see netem-delay.log")


def measure_net(reg: Registry, ref_name: str, big_digest: str) -> dict:
    """Timed 4 KiB range requests (RTT) and a full blob GET (throughput) through the shaping."""
    url = f"http://{reg.host}/v2/{ref_name}/blobs/{big_digest}"
    rtts = []
    for _ in range(5):
        o = run(
            [
                "curl",
                "-fsS",
                "-o",
                "/dev/null",
                "-r",
                "0-4095",
                "-w",
                "%{time_connect} %{time_starttransfer}",
                url,
            ]
        ).stdout.split()
        connect, ttfb = float(o[0]), float(o[1])
        rtts.append({"connect_s": connect, "ttfb_s": ttfb})
    o = run(
        ["curl", "-fsS", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url],
        timeout=600,
    ).stdout.split()
    size, tot = float(o[0]), float(o[1])
    return {
        "connect_s_median": statistics.median(r["connect_s"] for r in rtts),
        "range4k_ttfb_s_median": statistics.median(r["ttfb_s"] for r in rtts),
        "full_blob_bytes": int(size),
        "full_blob_s": tot,
        "throughput_mbit_s": size * 8 / tot / 1e6,
    }


def registry_bytes(reg: Registry) -> int:
    """Blob body bytes the registry has sent so far (needs ``access_log=True``)."""
    return sum(r.size for r in reg.blob_requests() if r.method == "GET")
