"""Real daemons for end-to-end tests: a docker-registry, containerd 1.6, and our snapshotter.

Each runs in its own temporary directory, is ready only once it answers a real request
(never a fixed sleep), fails fast with its log when the process dies while we wait, and is
stopped by PID. Logs are kept in the instance directory and shown on failure.

Use them through the pytest fixtures in :mod:`harness.fixtures`, or directly::

    with Registry.start() as reg, StargzDaemon.start() as sd, Containerd.start(sd.address) as c:
        reg.push_oci(shared_dir() / "fixtures/oci-busybox", "1", "busybox:1")
        c.ctr("images", "pull", "--plain-http", "--snapshotter", "stargz", reg.ref("busybox:1"))
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[2]

#: Short base dir: unix socket paths must stay under 108 bytes.
TMP_BASE = os.environ.get("STARGZ_TEST_TMP", "/tmp")


class HarnessError(AssertionError):
    """A daemon did not start or stop as it should (an AssertionError: the test fails)."""


def shared_dir() -> Path:
    """The shared fixtures/tools directory: $STARGZ_SHARED, <repo>/../shared, /work/shared.

    Raises (so the test fails, never skips) when none of them exists.
    """
    candidates = [os.environ.get("STARGZ_SHARED"), str(REPO.parent / "shared"), "/work/shared"]
    for c in candidates:
        if c and (Path(c) / "fixtures").is_dir():
            return Path(c)
    raise HarnessError(
        "shared fixtures not found; looked in $STARGZ_SHARED, "
        f"{REPO.parent / 'shared'} and /work/shared"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tempdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir=TMP_BASE))


def unmount_under(path: Path) -> None:
    """Lazily unmount everything mounted at or below ``path`` (deepest first)."""
    prefix = os.path.join(os.path.realpath(path), "")
    mps = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split(" ")[4].replace("\\040", " ")
            if os.path.join(mp, "").startswith(prefix):
                mps.append(mp)
    for mp in sorted(set(mps), key=lambda p: -p.count("/")):
        subprocess.run(["umount", "-l", mp], check=False, capture_output=True)


def run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 300, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise with its argv, exit code and output."""
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise HarnessError(
            f"{' '.join(argv)} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
        )
    return p


class Daemon:
    """A child process with a log file, stopped by PID."""

    name = "daemon"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._final_log: str | None = None

    def _spawn(self, argv: Sequence[str], **kw: Any) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kw,
            )

    def _answers(self) -> bool:
        """Whether the daemon answers a real request (each daemon defines it)."""
        raise NotImplementedError

    def _launch(self, argv: Sequence[str], **kw: Any) -> None:
        """Spawn and wait until it answers; on failure, stop it and clean up."""
        try:
            self._spawn(argv, **kw)
            self.wait_ready(self._answers)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        """The process's output so far (kept after :meth:`close` deletes the work dir)."""
        if self._final_log is not None:
            return self._final_log
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, probe: Callable[[], bool], timeout: float = 30) -> None:
        """Poll ``probe`` until it returns True; fail at once if the process exits."""
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise HarnessError(
                    f"{self.name} exited ({code}) while starting; log:\n{self.log_text()[-4000:]}"
                )
            try:
                if probe():
                    return
            except Exception as e:  # not ready yet
                last = e
            time.sleep(0.02)
        raise HarnessError(
            f"{self.name} not ready after {timeout}s (last error: {last!r}); "
            f"log:\n{self.log_text()[-4000:]}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        """Signal the process, wait for it, SIGKILL if it does not exit in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        """Stop, unmount whatever is left under the work dir, delete it."""
        try:
            self.stop()
        finally:
            self._final_log = self.log_text()
            unmount_under(self.workdir)
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: One request in the registry's access log (gorilla's combined log format).
_ACCESS_LINE = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]*\] "(?P<method>GET|HEAD) /v2/\S+/blobs/(?P<digest>sha256:[0-9a-f]{64})'
    r'(?:\?\S*)? HTTP/[0-9.]+" (?P<status>\d{3}) (?P<size>\d+|-)(?: "[^"]*" "(?P<agent>[^"]*)")?',
    re.MULTILINE,
)


@dataclasses.dataclass(frozen=True)
class BlobRequest:
    method: str
    digest: str
    status: int
    size: int
    #: The client's User-Agent ("stargz-snapshotter-py/..." for our daemon).
    agent: str = ""


@dataclasses.dataclass(frozen=True)
class TokenAuth:
    """docker-registry's ``auth: token`` settings: who issues tokens and how to check them."""

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path


#: Any request to the registry API in the access log.
_ANY_LINE = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<path>/v2/\S*) HTTP/[0-9.]+"'
    r" (?P<status>\d{3})",
    re.MULTILINE,
)


@dataclasses.dataclass(frozen=True)
class ApiRequest:
    method: str
    #: The request path with its query string, e.g. ``/v2/app/blobs/uploads/?mount=...``.
    path: str
    status: int


class Registry(Daemon):
    """The CNCF distribution registry (Debian ``docker-registry``) on 127.0.0.1:<free port>."""

    name = "registry"

    @classmethod
    def start(
        cls,
        workdir: Path | None = None,
        *,
        access_log: bool = False,
        tls: tuple[Path, Path] | None = None,
        htpasswd: Path | None = None,
        token: TokenAuth | None = None,
        proxy_remote: str | None = None,
        basic_auth: tuple[str, str] | None = None,
    ) -> Registry:
        """Start on a free port. With ``access_log``, the registry logs one line per request
        (combined log format, with the response's byte count and the client's User-Agent):
        see :meth:`blob_requests`.

        ``tls``: (certificate, key) PEM files; the registry serves https only.
        ``htpasswd``: basic auth against that file (bcrypt lines).
        ``token``: bearer-token auth (``auth: token``), tokens from ``token.realm``.
        ``proxy_remote``: a pull-through cache of the registry at that URL (read-only).
        ``basic_auth``: (user, password) written to an htpasswd file (bcrypt) and required;
        :meth:`push_oci` sends them.
        """
        self = cls(workdir or make_tempdir("sgz-reg-"))
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.scheme = "https" if tls else "http"
        self.access_log = access_log
        self.credentials: tuple[str, str] | None = basic_auth
        self.basic_auth = basic_auth
        self.storage = self.workdir / "storage"
        self.storage.mkdir()
        if basic_auth is not None:
            import bcrypt

            user, password = basic_auth
            hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=6)).decode()
            htpasswd = self.workdir / "htpasswd"
            htpasswd.write_text(f"{user}:{hashed}\n")
        cfg = self.workdir / "config.yml"
        text = (
            "version: 0.1\n"
            "log:\n  level: warn\n  accesslog:\n"
            f"    disabled: {'false' if access_log else 'true'}\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n"
        )
        if tls:
            text += f"  tls:\n    certificate: {tls[0]}\n    key: {tls[1]}\n"
        if htpasswd:
            text += f"auth:\n  htpasswd:\n    realm: test-registry\n    path: {htpasswd}\n"
        elif token:
            text += (
                f"auth:\n  token:\n    realm: {token.realm}\n    service: {token.service}\n"
                f"    issuer: {token.issuer}\n    rootcertbundle: {token.rootcertbundle}\n"
            )
        if proxy_remote:
            text += f"proxy:\n  remoteurl: {proxy_remote}\n"
        cfg.write_text(text)
        self._launch([shutil.which("docker-registry") or "docker-registry", "serve", str(cfg)])
        return self

    def restart(self) -> None:
        """Start again (after :meth:`stop`) on the same port, config and storage."""
        self._spawn(
            [
                shutil.which("docker-registry") or "docker-registry",
                "serve",
                str(self.workdir / "config.yml"),
            ]
        )
        self.wait_ready(self._answers)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def _answers(self) -> bool:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # readiness only
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=2, context=ctx) as r:
                return r.status == 200
        except urllib.error.HTTPError as e:
            return e.code == 401  # up, and wants credentials

    def ref(self, name: str) -> str:
        return f"{self.host}/{name}"

    def blob_requests(self, digest: str | None = None) -> list[BlobRequest]:
        """Every ``GET``/``HEAD`` of a blob the registry has answered so far (of ``digest``
        only, if given), from its access log: the server-side record of what was fetched.

        Needs ``start(access_log=True)``. A line is written when its response is complete.
        """
        assert self.access_log, "start the registry with access_log=True"
        out = []
        for m in _ACCESS_LINE.finditer(self.log_text()):
            if digest is None or m["digest"] == digest:
                size = 0 if m["size"] == "-" else int(m["size"])
                out.append(
                    BlobRequest(m["method"], m["digest"], int(m["status"]), size, m["agent"] or "")
                )
        return out

    def requests(self) -> list[ApiRequest]:
        """Every registry API request answered so far (needs ``start(access_log=True)``)."""
        assert self.access_log, "start the registry with access_log=True"
        return [
            ApiRequest(m["method"], m["path"], int(m["status"]))
            for m in _ANY_LINE.finditer(self.log_text())
        ]

    def blob_file(self, digest: str) -> Path:
        """Where the registry's filesystem storage keeps blob ``digest``'s bytes."""
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def blob_bytes(self, digest: str) -> int:
        """Body bytes the registry has sent for blob ``digest`` so far."""
        return sum(r.size for r in self.blob_requests(digest) if r.method == "GET")

    def push_oci(
        self,
        layout: Path,
        tag: str,
        name: str,
        *,
        all_platforms: bool = False,
        docker_format: bool = False,
    ) -> str:
        """Copy ``layout:tag`` (an OCI image layout) to ``name`` in this registry
        (``all_platforms``: an index with every image it lists, not just the host's;
        ``docker_format``: as Docker schema 2 manifests and manifest lists)."""
        staged = layout
        if layout.resolve().is_relative_to(shared_dir().resolve()):
            # The shared fixtures are read-only inputs; skopeo may write (locks).
            staged = self.workdir / "staged" / layout.name
            if not staged.exists():
                shutil.copytree(layout, staged)
                for p in [staged, *staged.rglob("*")]:
                    p.chmod(p.stat().st_mode | 0o200)
        creds = [f"--dest-creds={':'.join(self.credentials)}"] if self.credentials else []
        run(
            [
                "skopeo",
                "--insecure-policy",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                *(["--all"] if all_platforms else []),
                *(["--format", "v2s2"] if docker_format else []),
                *creds,
                f"oci:{staged}:{tag}",
                f"docker://{self.ref(name)}",
            ]
        )
        return self.ref(name)


class StargzDaemon(Daemon):
    """Our ``containerd-stargz-grpc``, run from this checkout with the test's Python."""

    name = "stargz"

    @classmethod
    def start(
        cls,
        workdir: Path | None = None,
        *,
        config_text: str = "",
        log_level: str = "debug",
        extra_args: Sequence[str] = (),
        address: str | None = None,
        root: str | None = None,
        env: dict[str, str] | None = None,
    ) -> StargzDaemon:
        """Start on ``<workdir>/run/stargz.sock`` and ``<workdir>/root`` unless given;
        ``env`` is added to the daemon's environment (``DOCKER_CONFIG``...)."""
        self = cls(workdir or make_tempdir("sgz-d-"))
        self.env = dict(env or {})
        self.address = address or str(self.workdir / "run" / "stargz.sock")
        self.root = root or str(self.workdir / "root")
        self.config_path = self.workdir / "config.toml"
        self.config_path.write_text(config_text)
        self.log_level = log_level
        self.extra_args = list(extra_args)
        try:
            self.restart()
        except BaseException:
            self.close()
            raise
        return self

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "stargz.cli.daemon",
            "--address",
            self.address,
            "--root",
            self.root,
            "--config",
            str(self.config_path),
            "--log-level",
            self.log_level,
            *self.extra_args,
        ]

    def restart(self) -> None:
        """(Re)start on the same root and socket, and wait until it answers List."""
        if self.alive():
            self.stop()
        # (``env`` may name another PYTHONPATH: a benchmark's baseline source tree)
        env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **getattr(self, "env", {})}
        self._spawn(self.argv(), env=env)
        self.wait_ready(self._answers)

    def _answers(self) -> bool:
        from stargz.service.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb

        with self.channel() as ch:
            stub = self.stub(ch)
            list(stub.List(pb.ListSnapshotsRequest(), timeout=2))
        return True

    def channel(self) -> Any:
        import grpc

        return grpc.insecure_channel(f"unix:{self.address}")

    @staticmethod
    def stub(channel: Any) -> Any:
        from stargz.service.proto.containerd.services.snapshots.v1 import snapshots_pb2_grpc

        return snapshots_pb2_grpc.SnapshotsStub(channel)

    def log_records(self) -> list[dict[str, Any]]:
        """The daemon's JSON log lines (anything else in the log is ignored)."""
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out

    def holder_pid(self) -> int | None:
        """The pid of the process keeping this daemon's FUSE connection, if one lives."""
        from stargz.fuse.holder import HolderClient

        return HolderClient(os.path.join(self.root, "holder")).pid()

    def release_fuse(self) -> None:
        """Let the holder go (it closes the kept connection and exits), by its pid."""
        from stargz.fuse.holder import HolderClient

        client = HolderClient(os.path.join(self.root, "holder"))
        pid = client.pid()
        client.drop()
        if pid is not None and client.pid() is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        """Stop, let the FUSE holder go (after SIGTERM it keeps a mount nobody serves, which
        would hang any walk of the work dir), then unmount and delete as `Daemon.close`."""
        try:
            self.stop()
        finally:
            if hasattr(self, "root"):
                self.release_fuse()
            super().close()

    def snapshot_dirs(self) -> set[str]:
        d = Path(self.root) / "snapshots"
        return {p.name for p in d.iterdir()} if d.is_dir() else set()


_MANUAL_GC = """
[plugins."io.containerd.gc.v1.scheduler"]
  deletion_threshold = 0
  mutation_threshold = 1000000000
  startup_delay = "1h"
"""


class Containerd(Daemon):
    """containerd 1.6 with a temporary root/state/socket and ``[proxy_plugins.stargz]``.

    Its garbage collector runs only when asked (``ctr images rm --sync``, ``ctr leases rm
    --sync``), not on its own after N mutations: otherwise it collects, at a moment no test
    controls, every snapshot made with ``ctr snapshots prepare/view`` (they hold no lease).
    Pass ``gc_on_its_own=True`` for containerd's default scheduling. ``edit_config`` gets
    the config text before it is written and returns the text to use (a test of a node's
    setup runs containerd with a config that is wrong in one place).

    With ``cri_registry="127.0.0.1:PORT"``, containerd's CRI plugin is on (its unpacker uses
    the ``stargz`` snapshotter and sends the snapshot annotations a lazy pull needs; that
    registry is reached over plain HTTP, through a ``registry.mirrors`` entry, with no
    credentials): see :meth:`cri_pull` and `harness.cri.CRIClient`. Its sandbox image is
    :data:`SANDBOX_IMAGE` (:meth:`import_sandbox_image` provides it) and
    ``restrict_oom_score_adj`` is on (runc may not lower the sandbox's ``oom_score_adj``
    here). No CNI is configured: pods run on the host network.
    """

    name = "containerd"

    @classmethod
    def start(
        cls,
        stargz_address: str,
        workdir: Path | None = None,
        *,
        gc_on_its_own: bool = False,
        cri_registry: str | None = None,
        edit_config: Callable[[str], str] | None = None,
    ) -> Containerd:
        self = cls(workdir or make_tempdir("sgz-c-"))
        self.address = str(self.workdir / "containerd.sock")
        root, state = self.workdir / "root", self.workdir / "state"
        self.config_path = cfg = self.workdir / "config.toml"
        text = f"""version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
{"" if cri_registry else '  "io.containerd.grpc.v1.cri",'}
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{self.address}"

[ttrpc]
  address = "{self.address}.ttrpc"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{root}/opt"
{"" if gc_on_its_own else _MANUAL_GC}
{_cri_config(root, cri_registry) if cri_registry else ""}
[proxy_plugins]
  [proxy_plugins.stargz]
    type = "snapshot"
    address = "{stargz_address}"
"""
        cfg.write_text(edit_config(text) if edit_config is not None else text)
        self._launch(["containerd", "--config", str(cfg)])
        return self

    def _answers(self) -> bool:
        return run(["ctr", "-a", self.address, "version"], check=False, timeout=5).returncode == 0

    def restart(self) -> None:
        """Stop (SIGTERM, by PID) and start again on the same root, state and socket; wait
        until it answers. Its tasks' shims and our snapshotter are left running."""
        self.stop()
        self._spawn(["containerd", "--config", str(self.workdir / "config.toml")])
        self.wait_ready(self._answers)

    def cri_pull(self, ref: str, timeout: float = 120) -> str:
        """CRI ``ImageService/PullImage`` of ``ref`` (as the kubelet sends it); returns the
        image ID. The pull runs inside containerd, in namespace ``k8s.io``."""
        from .cri import CRIClient

        with CRIClient(self.address, timeout=timeout) as cri:
            return cri.pull(ref)

    def import_sandbox_image(self, shared: Path) -> str:
        """Put :data:`SANDBOX_IMAGE` (the busybox fixture whose entrypoint is
        ``/bin/sleep 3600``: a pause container that blocks) into namespace ``k8s.io``,
        unpacked for the ``stargz`` snapshotter, as ``ctr -n k8s.io images import`` does on a
        node without registry access. Returns its name."""
        from .oci import with_entrypoint

        layout = with_entrypoint(
            shared / "fixtures" / "oci-busybox", "1", self.workdir / "pause", "sleep",
            ["/bin/sleep"], ["3600"],
        )  # fmt: skip
        archive = self.workdir / "pause.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(layout, arcname=".")
        name, _, tag = SANDBOX_IMAGE.rpartition(":")
        self.ctr(
            "images", "import", "--snapshotter", "stargz", "--base-name", name, str(archive),
            ns="k8s.io",
        )  # fmt: skip
        listed = self.ctr("images", "ls", "-q", ns="k8s.io").stdout.split()
        if SANDBOX_IMAGE not in listed:
            raise HarnessError(f"{SANDBOX_IMAGE} not imported; images: {listed}")
        return SANDBOX_IMAGE

    def ctr(
        self, *args: str, ns: str = "default", check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return run(["ctr", "-a", self.address, "-n", ns, *args], check=check, timeout=timeout)

    def ctr_async(self, *args: str, ns: str = "default") -> subprocess.Popen[str]:
        """Start ctr without waiting; stdout (pull progress, unbounded) is discarded."""
        return subprocess.Popen(
            ["ctr", "-a", self.address, "-n", ns, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def kill_tasks(self) -> None:
        """Kill and delete every task containerd still runs (before stopping it)."""
        nss = self.ctr("namespaces", "ls", "-q", check=False).stdout.split()
        for ns in nss:
            for task in self.ctr("tasks", "ls", "-q", ns=ns, check=False).stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", task, ns=ns, check=False)
                self.ctr("tasks", "delete", "-f", task, ns=ns, check=False)

    def close(self) -> None:
        if self.alive():
            with contextlib.suppress(Exception):
                self.kill_tasks()
        super().close()


#: The CRI plugin's pause image: the busybox fixture blocking in ``sleep``, imported locally.
SANDBOX_IMAGE = "localhost/stargz-test/pause:sleep"


def _cri_config(root: Path, registry: str) -> str:
    return f"""
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = "{SANDBOX_IMAGE}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "stargz"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{root}/cni/bin"
    conf_dir = "{root}/cni/conf"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{registry}"]
    endpoint = ["http://{registry}"]
"""


def image_chain_id(c: Containerd, ref: str, ns: str, platform: str = "linux/amd64") -> str:
    """The chain ID of image ``ref``'s rootfs (its top snapshot), from containerd's content
    store: manifest (via the index for ``platform``) -> config -> ``rootfs.diff_ids``."""
    rows = [r.split() for r in c.ctr("images", "ls", ns=ns).stdout.splitlines()[1:]]
    found = [r for r in rows if r and r[0] == ref]
    if not found:
        raise HarnessError(f"no image {ref} in namespace {ns}")
    mtype, digest = found[0][1], found[0][2]
    doc = json.loads(c.ctr("content", "get", digest, ns=ns).stdout)
    if "manifests" in doc or mtype.endswith(("image.index.v1+json", "manifest.list.v2+json")):
        osname, arch = platform.split("/")[:2]
        for m in doc["manifests"]:
            p = m.get("platform", {})
            if p.get("os") == osname and p.get("architecture") == arch:
                doc = json.loads(c.ctr("content", "get", m["digest"], ns=ns).stdout)
                break
        else:
            raise HarnessError(f"{ref}: no manifest for {platform}")
    config = json.loads(c.ctr("content", "get", doc["config"]["digest"], ns=ns).stdout)
    chain = ""
    for diff_id in config["rootfs"]["diff_ids"]:
        chain = (
            diff_id
            if not chain
            else "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
        )
    return chain


@contextlib.contextmanager
def mounted_image(c: Containerd, ref: str, ns: str, snapshotter: str = "stargz") -> Iterator[Path]:
    """Image ``ref``'s rootfs from ``snapshotter``, mounted read-only at a temp dir; unmounted
    (and its view snapshot removed) on exit.

    A view of the image's top snapshot, mounted as the snapshotter says. Not ``ctr images
    mount``: ctr 1.6 reads its ``--snapshotter`` flag as a global one, which never is set,
    so it always mounts (and, when needed, unpacks) with overlayfs.
    """
    target = make_tempdir("sgz-mnt-")
    key = f"view-{target.name}"
    try:
        chain = image_chain_id(c, ref, ns)
        out = c.ctr(
            "snapshots", "--snapshotter", snapshotter, "view", "--mounts", key, chain, ns=ns
        )
        for m in json.loads(out.stdout):
            opts = ",".join(m.get("Options") or [])
            argv = ["mount"] if m["Type"] == "bind" else ["mount", "-t", m["Type"]]
            run([*argv, *(["-o", opts] if opts else []), m["Source"], str(target)])
        yield target
    finally:
        unmount_under(target)
        c.ctr("snapshots", "--snapshotter", snapshotter, "rm", key, ns=ns, check=False)
        shutil.rmtree(target, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    fstype: str
    #: The directory of the mounted filesystem that appears at the mount point ("/" unless
    #: a bind mount of a subtree).
    root: str


def mounts_under(path: str | os.PathLike[str]) -> dict[str, MountEntry]:
    """Mount point -> :class:`MountEntry` of every mount at or below ``path``."""
    prefix = os.path.join(os.path.realpath(path), "")
    out = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ")
            mp = fields[4].replace("\\040", " ")
            if os.path.join(mp, "").startswith(prefix):
                fstype = fields[fields.index("-") + 1]
                out[mp] = MountEntry(int(fields[0]), fstype, fields[3].replace("\\040", " "))
    return out


def tree_listing(root: Path) -> dict[str, Any]:
    """The canonical listing of ``root`` by the shared ``tools/tree_listing.py``."""
    tool = shared_dir() / "tools" / "tree_listing.py"
    out = run([sys.executable, str(tool), str(root)]).stdout
    return json.loads(out)


def http_get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        raise HarnessError(f"GET {url}: {e.code}") from e
