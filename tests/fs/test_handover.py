"""The FUSE connection outlives the daemon (`stargz.fuse.handover`), on real FUSE mounts.

A daemon process (``handover_daemon.py``) mounts a layer with its descriptor kept by a
real holder process; it is killed with SIGKILL while it holds a READ it will never
answer; a new filesystem on the same root takes the connection over. The file opened
before the kill keeps working, inode numbers do not change, the bind mount is the same
mount, and the READ the dead daemon swallowed is answered after FUSE_NOTIFY_RESEND.

The systemd path runs against a fake of the one part that cannot run here (systemd as
PID 1): `FakeServiceManager` listens on a ``$NOTIFY_SOCKET``, keeps the descriptors sent
with ``FDSTORE=1`` and starts the next process with them from fd 3 and
``LISTEN_FDS``/``LISTEN_FDNAMES``/``LISTEN_PID``, as systemd does. Everything else (the
FUSE mount, the daemon processes, the kill) is real.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from stargz import mountinfo
from stargz.errors import FailedPrecondition
from stargz.fs import FsOptions, LocalLayerSource, StargzFileSystem, mounts, takeover
from stargz.fuse import fdstore, handover
from stargz.fuse.holder import HolderClient

from .conftest import labels_for

DAEMON = Path(__file__).with_name("handover_daemon.py")
REPO_SRC = Path(__file__).resolve().parents[2] / "src"
NOISE = "data/noise.bin"


def _mount_ids(path: Path) -> list[tuple[str, str, str]]:
    real = os.path.realpath(path)
    return [(e[1], e[2], e[3]) for e in mountinfo.entries() if e[0] == real]


def _mount_line(path: Path) -> list[str]:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return [ln.split(" ")[0] for ln in f if ln.split(" ")[4] == real]


class _Child:
    """The daemon process; stopped by PID."""

    def __init__(
        self, argv: list[str], env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = ()
    ) -> None:
        self.proc = subprocess.Popen(
            argv,
            pass_fds=pass_fds,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )

    def wait_line(self, word: str, timeout: float = 30) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if r:
                line = self.proc.stdout.readline()
                if line.strip() == word:
                    return
                if not line:
                    break
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        err = self.proc.stderr.read()
        raise AssertionError(f"no {word!r} from the daemon (exit {self.proc.poll()}): {err}")

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def _daemon_argv(root: Path, layout: Path, labels: dict[str, str], mp: Path, hang: str = ""):
    argv = [sys.executable, str(DAEMON), "--root", str(root), "--layout", str(layout)]
    argv += ["--labels", json.dumps(labels), "--mountpoint", str(mp)]
    return argv + (["--hang-when", hang] if hang else [])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env.pop("FDSTORE", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_SRC), str(DAEMON.parents[2])])
    env.update(extra)
    return env


@pytest.fixture
def holder_dir(fs_env) -> Any:
    d = fs_env.root / "holder"
    yield d
    pid = HolderClient(str(d)).pid()
    if pid is not None:  # a test that failed half-way: stop the holder it left
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _start_kept(fs_env, source, keeper, **options: Any) -> StargzFileSystem:
    async def make() -> StargzFileSystem:
        fs = StargzFileSystem(
            str(fs_env.root),
            source,
            FsOptions(no_background_fetch=True, noprefetch=True, **options),
            handover=keeper,
        )
        await fs.start()
        return fs

    fs_env.fs = fs_env.run(make())
    return fs_env.fs


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _reader(path: Path, out: dict[str, Any]) -> threading.Thread:
    """Read ``path`` whole in a thread, with O_DIRECT: every READ's answer (an error too)
    reaches the reader; a buffered read would retry a failed read-ahead by itself."""

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                parts = []
                while chunk := os.read(fd, 1 << 20):
                    parts.append(chunk)
            finally:
                os.close(fd)
            out["sha"] = _sha(b"".join(parts))
        except OSError as e:
            out["error"] = e
        out["t"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_kill9_with_a_read_in_flight_is_invisible_to_the_reader(
    fs_env, corners, merged_truth, holder_dir
):
    layer = corners.layers("esgz")[0]
    labels = labels_for(layer)
    mp = fs_env.mountpoint()
    hang = fs_env.base / "hang"
    child = _Child(_daemon_argv(fs_env.root, corners.root, labels, mp, str(hang)), _env())
    try:
        child.wait_line("READY")
        holder_pid = HolderClient(str(holder_dir)).pid()
        assert holder_pid is not None and holder_pid != child.proc.pid
        st_before = os.stat(mp / "etc")
        opened = open(mp / "etc" / "greeting", "rb")  # noqa: SIM115 (kept across the kill)
        greeting = opened.read()
        mount_before = _mount_line(mp)
        got: dict[str, Any] = {}
        hang.touch()
        reader = _reader(mp / NOISE, got)
        child.wait_line("HANG")  # the daemon took the READ and will never answer it
    finally:
        child.kill9()
    # the connection lives on in the holder: the read waits, it does not fail
    reader.join(0.5)
    assert reader.is_alive() and not got, got
    t_kill = time.monotonic()

    keeper = handover.HolderHandover(str(holder_dir))
    fs = _start_kept(fs_env, LocalLayerSource(layouts=[corners.root]), keeper)
    assert fs.connection_kept
    reader.join(20)
    assert not reader.is_alive(), "the READ taken by the killed daemon was never answered"
    assert "error" not in got, got
    assert got["sha"] == merged_truth["entries"][NOISE]["sha256"]
    assert got["t"] > t_kill
    # same mount, same inode numbers, the file opened before the kill still reads
    assert _mount_line(mp) == mount_before
    assert os.stat(mp / "etc").st_ino == st_before.st_ino
    opened.seek(0)
    assert opened.read() == greeting
    opened.close()
    # the snapshotter's restore registers the existing bind; it does not mount again
    fs_env.run(fs.mount(str(mp), labels))
    assert _mount_line(mp) == mount_before
    assert fs.mountpoints == {os.path.normpath(str(mp)): layer.digest}

    # a stop that unmounts lets the holder go: it exits and the mount is gone
    fs_env.close_fs(unmount=True)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and HolderClient(str(holder_dir)).pid() is not None:
        time.sleep(0.02)
    assert HolderClient(str(holder_dir)).pid() is None
    assert not _mount_ids(fs_env.root / "fuse")


def test_clean_stop_keeps_the_mount_and_next_start_takes_it(fs_env, corners, holder_dir):
    source = LocalLayerSource(layouts=[corners.root])
    keeper = handover.HolderHandover(str(holder_dir))
    fs = _start_kept(fs_env, source, keeper)
    assert not fs.connection_kept
    l1, l2 = corners.layers("esgz")
    m1, m2 = fs_env.mount(l1), fs_env.mount(l2)
    ino = {p: os.stat(p).st_ino for p in (m1 / "etc", m2 / "etc", m1 / NOISE)}
    fs_env.close_fs(unmount=False)  # SIGTERM: the holder keeps the connection
    assert _mount_ids(m1) and _mount_ids(fs_env.root / "fuse")

    fs = _start_kept(fs_env, LocalLayerSource(layouts=[corners.root]), keeper)
    assert fs.connection_kept
    assert {p: os.stat(p).st_ino for p in ino} == ino
    assert (m1 / NOISE).stat().st_size > 0
    # a layer mounted after the take-over gets a new slot, never an old one
    l3 = corners.layers("esgz-64k")[0]
    m3 = fs_env.mount(l3)
    slots = json.loads((fs_env.root / "fuse-layers.json").read_text())
    got = {key.split()[-1]: (r["slot"], r["name"]) for key, r in slots["layers"].items()}
    assert got == {x.digest: (i, x.digest.split(":")[1]) for i, x in enumerate((l1, l2, l3), 1)}
    assert os.stat(m3 / "etc").st_ino >> 32 == 3


def test_a_taken_over_connection_splices_reads(fs_env, corners, merged_truth, holder_dir):
    """The spliced read path needs nothing INIT negotiated: the next daemon serving the
    kept connection splices answers from cache files just the same."""
    opts = {"passthrough": False, "memory_cache_bytes": 0}
    keeper = handover.HolderHandover(str(holder_dir))
    fs_env.fs = _start_kept(fs_env, LocalLayerSource(layouts=[corners.root]), keeper, **opts)
    layer = corners.layers("esgz")[0]
    mp = fs_env.mount(layer)
    want = merged_truth["entries"][NOISE]["sha256"]
    assert _sha((mp / NOISE).read_bytes()) == want  # fetched into the disk cache
    fs_env.close_fs(unmount=False)

    fs = _start_kept(fs_env, LocalLayerSource(layouts=[corners.root]), keeper, **opts)
    assert fs.connection_kept
    # the first read checks the cache files found at start, the next ones splice them
    for _ in range(3):
        fd = os.open(mp / NOISE, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        assert _sha((mp / NOISE).read_bytes()) == want
    on, spliced, fallbacks = fs.splice_counts
    assert on and spliced > 0 and fallbacks == 0


def test_holder_exits_when_the_connection_ends(fs_env, corners, holder_dir):
    keeper = handover.HolderHandover(str(holder_dir))
    fs = _start_kept(fs_env, LocalLayerSource(layouts=[corners.root]), keeper)
    pid = keeper.client.pid()
    assert pid is not None
    assert oct(os.stat(holder_dir).st_mode & 0o777) == "0o700"
    assert oct(os.stat(holder_dir / "holder.sock").st_mode & 0o777) == "0o600"
    # someone unmounts the FUSE root behind the daemon's back: the connection ends
    assert mounts.unmount(str(fs_env.root / "fuse"), mounts.MNT_DETACH)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and keeper.client.pid() is not None:
        time.sleep(0.02)
    assert keeper.client.pid() is None
    # and the next start does not take a dead connection: it mounts anew
    fs_env.close_fs(unmount=True)
    fs = _start_kept(fs_env, LocalLayerSource(layouts=[corners.root]), keeper)
    assert not fs.connection_kept
    assert os.listdir(fs_env.root / "fuse") == []


# --- systemd's descriptor store, faked ----------------------------------------------------------


class FakeServiceManager:
    """What systemd does with ``FDSTORE=1`` and on a restart, and nothing more."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.stored: dict[str, int] = {}
        self.messages: list[str] = []

    def pump(self) -> None:
        """Handle every datagram received so far."""
        while select.select([self.sock], [], [], 0)[0]:
            msg, fds, _, _ = socket.recv_fds(self.sock, 4096, 4)
            fields = dict(x.split("=", 1) for x in msg.decode().splitlines() if "=" in x)
            self.messages.append(msg.decode())
            name = fields.get("FDNAME", "stored")
            if fields.get("FDSTORE") == "1":
                for fd in fds:
                    old = self.stored.pop(name, None)
                    if old is not None:
                        os.close(old)
                    self.stored[name] = fd
            elif fields.get("FDSTOREREMOVE") == "1":
                old = self.stored.pop(name, None)
                if old is not None:
                    os.close(old)

    def start(self, argv: list[str]) -> _Child:
        """Start a service process the way systemd does: stored fds from 3 on."""
        self.pump()
        names = list(self.stored)
        fds = [self.stored[n] for n in names]
        env = _env(NOTIFY_SOCKET=self.path, FDSTORE="1")
        if fds:
            env.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(names))
        # (systemd does this between fork and exec: fds from 3 on, LISTEN_PID = its pid)
        exec_as_service = (
            "import fcntl, os, sys\n"
            "fds = [int(x) for x in sys.argv[1].split(',') if x]\n"
            "moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]\n"
            "for i, fd in enumerate(moved):\n"
            "    os.dup2(fd, 3 + i, inheritable=True)\n"
            "if fds:\n"
            "    os.environ['LISTEN_PID'] = str(os.getpid())\n"
            "os.execv(sys.argv[2], sys.argv[2:])\n"
        )
        wrapper = [sys.executable, "-c", exec_as_service, ",".join(map(str, fds))]
        return _Child([*wrapper, *argv], env, tuple(fds))

    def close(self) -> None:
        for fd in self.stored.values():
            os.close(fd)
        self.stored.clear()
        self.sock.close()


def test_systemd_fd_store_carries_the_connection_across_a_kill9(fs_env, corners, merged_truth):
    layer = corners.layers("esgz")[0]
    labels = labels_for(layer)
    mp = fs_env.mountpoint()
    manager = FakeServiceManager(fs_env.base)
    argv = _daemon_argv(fs_env.root, corners.root, labels, mp)
    try:
        first = manager.start(argv)
        try:
            first.wait_line("READY")
            manager.pump()
            assert list(manager.stored) == [handover.FD_NAME]
            assert "FDSTORE=1\nFDNAME=stargz-fuse" in manager.messages
            state = fs_env.root / "fuse-handover.json"
            assert oct(state.stat().st_mode & 0o777) == "0o600"
            assert not (fs_env.root / "holder").exists()  # no holder under systemd
            ino = os.stat(mp / NOISE).st_ino
            mount_before = _mount_line(mp)
        finally:
            first.kill9()
        second = manager.start(argv)
        try:
            second.wait_line("READY")
            # the second daemon served the stored connection: same mount, same inode
            assert _mount_line(mp) == mount_before
            assert os.stat(mp / NOISE).st_ino == ino
            assert _sha((mp / NOISE).read_bytes()) == merged_truth["entries"][NOISE]["sha256"]
        finally:
            second.kill9()
    finally:
        manager.close()  # the manager's copy was the last: the connection ends
        for p in sorted(_mount_ids_under(fs_env.base), key=lambda p: -p.count("/")):
            with contextlib.suppress(OSError):
                mounts.unmount(p, mounts.MNT_DETACH)


def _mount_ids_under(base: Path) -> list[str]:
    prefix = os.path.join(os.path.realpath(base), "")
    return [mp for mp in mountinfo.mount_points() if os.path.join(mp, "").startswith(prefix)]


def test_listen_fds_ignores_variables_meant_for_another_process():
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert fdstore.listen_fds(env) == {}
    assert "LISTEN_FDS" not in env  # consumed either way: children must not see them
    assert not fdstore.available({"NOTIFY_SOCKET": "/run/x"})
    assert fdstore.available({"NOTIFY_SOCKET": "/run/x", "FDSTORE": "1"})


def test_passthrough_ids_of_the_previous_daemon_are_reused(fs_env, corners, holder_dir):
    """Backing ids belong to the connection: after a take-over, a file the previous daemon
    passed through keeps its id (a second one for the same inode: EBUSY, the open fails
    with EIO), and a file held open in cached mode across the restart is never switched to
    passthrough under it (the kernel refuses to mix modes: EIO)."""
    keeper = handover.HolderHandover(str(holder_dir))

    async def make(opts: FsOptions) -> StargzFileSystem:
        fs = StargzFileSystem(
            str(fs_env.root), LocalLayerSource(layouts=[corners.root]), opts, handover=keeper
        )
        await fs.start()
        return fs

    opts = FsOptions(no_background_fetch=True, noprefetch=True, passthrough=True)
    fs = fs_env.fs = fs_env.run(make(opts))
    if not fs._session.passthrough:
        pytest.skip("this kernel does not offer FUSE passthrough (needs >= 6.9)")
    m = fs_env.mount(corners.layers("esgz")[0])
    small = sorted(p for p in (m / "data" / "many").iterdir() if 0 < p.stat().st_size < 4096)[:4]
    through, cached = small[0], small[1]
    want = {p: p.read_bytes() for p in small}  # (cached opens; chunks now cached)
    before = fs.metrics.passthrough_opens
    deadline = time.monotonic() + 10
    while fs.metrics.passthrough_opens == before and time.monotonic() < deadline:
        through.read_bytes()
        time.sleep(0.05)
    assert fs.metrics.passthrough_opens > before
    held_through = open(through, "rb")  # noqa: SIM115 (held across the restart)
    held_cached = open(cached, "rb")  # noqa: SIM115
    fs_env.close_fs(unmount=False)

    fs = fs_env.fs = fs_env.run(make(opts))
    assert fs.connection_kept and fs._session.passthrough
    for p in small:  # every open works, whichever mode each inode is in
        assert p.read_bytes() == want[p]
    assert held_through.read() == want[through]
    assert held_cached.read() == want[cached]
    held_through.close()
    held_cached.close()
    assert cached.read_bytes() == want[cached]


def test_same_digest_from_two_repositories_keeps_its_names(fs_env, corners, holder_dir):
    """Which repository's copy of a digest got the plain name depends on mount order; a
    take-over reopens the layers concurrently, so the names come from the slot table."""
    from stargz.fs.source import STARGZ_REFERENCE_LABEL

    keeper = handover.HolderHandover(str(holder_dir))
    layer = corners.layers("esgz")[0]
    a = labels_for(layer)
    b = {**a, STARGZ_REFERENCE_LABEL: "other.test/copy:1"}
    fs = _start_kept(fs_env, LocalLayerSource(layouts=[corners.root]), keeper)
    ma, mb = fs_env.mountpoint(), fs_env.mountpoint()
    fs_env.run(fs.mount(str(ma), a))
    fs_env.run(fs.mount(str(mb), b))
    roots = {mp: _mount_ids(mp)[-1][1] for mp in (ma, mb)}
    assert len(set(roots.values())) == 2
    ino = {mp: os.stat(mp / "etc").st_ino for mp in (ma, mb)}
    assert ino[ma] != ino[mb]
    fs_env.close_fs(unmount=False)

    fs = _start_kept(fs_env, LocalLayerSource(layouts=[corners.root]), keeper)
    assert fs.connection_kept
    assert {mp: os.stat(mp / "etc").st_ino for mp in (ma, mb)} == ino
    assert sorted(os.listdir(fs_env.root / "fuse")) == sorted(r[1:] for r in roots.values())


def test_clean_stop_with_a_read_waiting_for_a_fetch(fs_env, corners, merged_truth, holder_dir):
    """SIGTERM while a READ waits for its chunk: the stopping daemon must not answer it
    (an EIO from a closing layer would reach the container); the next one gets it again."""
    keeper = handover.HolderHandover(str(holder_dir))
    slow = LocalLayerSource(layouts=[corners.root])
    fs = _start_kept(fs_env, slow, keeper)
    mp = fs_env.mount(corners.layers("esgz")[0])
    slow.latency = 3.0  # (the TOC is read already: only the file's chunks are slow)
    got: dict[str, Any] = {}
    reader = _reader(mp / NOISE, got)
    deadline = time.monotonic() + 5
    while fs._session is not None and fs._session.in_flight == 0:
        assert time.monotonic() < deadline, "the READ never reached the daemon"
        time.sleep(0.01)
    fs_env.close_fs(unmount=False)
    assert reader.is_alive() and not got, got

    _start_kept(fs_env, LocalLayerSource(layouts=[corners.root]), keeper)
    reader.join(20)
    assert not reader.is_alive()
    assert "error" not in got, got
    assert got["sha"] == merged_truth["entries"][NOISE]["sha256"]


def test_a_second_daemon_on_the_root_does_not_take_the_connection(fs_env, corners, holder_dir):
    keeper = handover.HolderHandover(str(holder_dir))
    _start_kept(fs_env, LocalLayerSource(layouts=[corners.root]), keeper)
    mp = fs_env.mount(corners.layers("esgz")[0])

    async def second() -> None:
        fs2 = StargzFileSystem(
            str(fs_env.root), LocalLayerSource(layouts=[corners.root]), handover=keeper
        )
        try:
            await fs2.start()
        finally:
            await fs2.close(unmount=False)

    with pytest.raises(FailedPrecondition, match="another daemon serves"):
        fs_env.run(second())
    assert (mp / NOISE).stat().st_size > 0  # the first one still serves
    assert keeper.client.pid() is not None


def test_clean_stop_on_a_kernel_without_resend_drains_first(
    fs_env, corners, merged_truth, holder_dir
):
    """Before 6.9 the kernel cannot resend (no FUSE_HAS_RESEND at INIT): a clean stop must
    then answer the READ waiting for a fetch before it lets go. The kernel here is newer,
    so the INIT offer is edited to what an older kernel offers: the one faked part."""
    from stargz.fuse.protocol import HAS_RESEND

    keeper = handover.HolderHandover(str(holder_dir))
    slow = LocalLayerSource(layouts=[corners.root])
    fs = _start_kept(fs_env, slow, keeper)
    assert fs._session is not None
    conn = fs._session.conn
    conn.offered &= ~HAS_RESEND
    keeper.keep(conn.fd, takeover.state_of(conn, fs.fuse_dev))  # what an old kernel left
    mp = fs_env.mount(corners.layers("esgz")[0])
    slow.latency = 0.5
    got: dict[str, Any] = {}
    reader = _reader(mp / NOISE, got)
    deadline = time.monotonic() + 5
    while fs._session.in_flight == 0:
        assert time.monotonic() < deadline, "the READ never reached the daemon"
        time.sleep(0.01)
    fs_env.close_fs(unmount=False)
    # the READ in flight was answered before the stop (later ones, if the reader got that
    # far, wait for the next daemon): without the wait it would never be answered
    assert "error" not in got, got
    _start_kept(fs_env, LocalLayerSource(layouts=[corners.root]), keeper)
    reader.join(20)
    assert got.get("sha") == merged_truth["entries"][NOISE]["sha256"], got
