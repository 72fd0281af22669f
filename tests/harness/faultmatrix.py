"""The fault matrix: reads of a lazily mounted layer while the network or the node misbehaves.

For each fault, a fresh ``containerd-stargz-grpc`` (lazy pulling on, real FUSE, background
fetch and prefetch off so every read goes to the registry) mounts two eStargz layers:

- the *faulted* layer (``oci-corners:esgz-64k``, 307 files, 64 KiB chunks), from a real
  docker-registry behind the fault proxy (:mod:`harness.faults`);
- the *other* layer (``oci-busybox:esgz``), from a second registry the fault never touches.

Then the fault is armed and every regular file of the faulted layer is read in 128 KiB
``O_DIRECT`` slices (four readers; past the page cache, so each read reaches the daemon),
while a fifth reader goes round the other layer. Each read is compared with the ground truth
(the files of the fixture layer's tar). After the fault is lifted, every slice that failed
is read again. A fault of the node (disk full, read-only cache, containerd restarted) is
made with the real thing: a small tmpfs as the cache directory, that tmpfs remounted
read-only, containerd stopped and started again on the same state.

The invariants, per fault (:meth:`Row.violations`): no wrong byte; no hang (every read
returns within ``fetching_timeout_sec`` + slack); no crash (the daemon is alive and answers
``List``); the other layer serves every read; a read either succeeds or fails with EIO
(nothing else); every slice reads correctly once the fault is gone; and where the fault is
one that retries get past (``expect="ok"``), no read fails at all.

``run_matrix`` is used by the CI test (tests/e2e/test_fault_matrix.py, a reduced set) and
by ``ci/faults.sh`` (benchmarks/bench_faults.py, the full set and a table).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .faults import (
    BearerAuth,
    Body,
    Delay,
    Every,
    PerRegion,
    PerRequest,
    ProxyThread,
    RedirectBlobs,
    Reset,
    ReshapeRange,
    Status,
    Storage,
    Switch,
)
from .procs import (
    Containerd,
    HarnessError,
    Registry,
    StargzDaemon,
    make_tempdir,
    mounts_under,
    run,
    shared_dir,
)

#: Bytes per read (one FUSE request of the default 128 KiB max_read).
SLICE = 128 << 10
#: Readers of the faulted layer at a time.
READERS = 4
FAULTED = ("oci-corners", "esgz-64k", 0)
OTHER = ("oci-busybox", "esgz", 0)
NS = "faults"


@dataclasses.dataclass(frozen=True)
class Timing:
    """The daemon's retry and timeout settings for the run (small, so faults run fast)."""

    fetching_timeout_sec: int = 4
    request_timeout_sec: int = 1
    max_retries: int = 3
    min_wait_msec: int = 50
    max_wait_msec: int = 500
    #: A read may take this long past ``fetching_timeout_sec`` (FUSE, decode, a loaded
    #: machine) before it counts as a hang.
    slack_sec: float = 4.0

    @property
    def bound(self) -> float:
        return self.fetching_timeout_sec + self.slack_sec

    def config(self) -> str:
        return (
            "no_background_fetch = true\n"
            "noprefetch = true\n"
            "[blob]\n"
            f"fetching_timeout_sec = {self.fetching_timeout_sec}\n"
            f"max_retries = {self.max_retries}\n"
            f"min_wait_msec = {self.min_wait_msec}\n"
            f"max_wait_msec = {self.max_wait_msec}\n"
            "[resolver]\n"
            f"request_timeout_sec = {self.request_timeout_sec}\n"
            # every read must reach the daemon's fetch path (and the slices are read with
            # O_DIRECT from unaligned buffers, which a passthrough file refuses with EINVAL
            # as the disk under it does)
            "[fuse]\n"
            "passthrough = false\n"
        )


# --- ground truth ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Slice:
    path: str
    offset: int
    data: bytes  # what the read must return


@dataclasses.dataclass(frozen=True)
class FixtureLayer:
    layout: Path
    tag: str
    digest: str
    toc_digest: str
    files: dict[str, bytes]

    @classmethod
    def load(cls, name: str, tag: str, index: int) -> FixtureLayer:
        import json

        layout = shared_dir() / "fixtures" / name
        man = None
        for m in json.loads((layout / "index.json").read_text())["manifests"]:
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
                man = json.loads((layout / "blobs/sha256" / m["digest"][7:]).read_text())
        if man is None:
            raise HarnessError(f"{layout}: no tag {tag}")
        desc = man["layers"][index]
        files: dict[str, bytes] = {}
        with tarfile.open(layout / "blobs/sha256" / desc["digest"][7:]) as tar:
            for m in tar.getmembers():
                name_ = m.name.removeprefix("./")
                if not m.isreg() or m.size == 0 or name_ in _NOT_FILES:
                    continue
                f = tar.extractfile(m)
                assert f is not None
                files[name_] = f.read()
        toc = desc["annotations"]["containerd.io/snapshot/stargz/toc.digest"]
        return cls(layout, tag, desc["digest"], toc, files)

    def slices(self, limit: int | None = None) -> list[Slice]:
        """Every file in SLICE-sized pieces; with ``limit``, that many spread over them."""
        out = [
            Slice(path, off, data[off : off + SLICE])
            for path, data in sorted(self.files.items())
            for off in range(0, len(data), SLICE)
        ]
        if limit is not None and len(out) > limit:
            step = len(out) / limit
            out = [out[int(i * step)] for i in range(limit)]
        return out


#: Entries of an eStargz tar that are not files of the layer.
_NOT_FILES = {"stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"}


# --- one read ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    slice: Slice
    started: float = 0.0
    ended: float | None = None
    errno: int | None = None
    wrong: bool = False

    @property
    def ok(self) -> bool:
        return self.ended is not None and self.errno is None and not self.wrong

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started


def read_slice(root: Path, s: Slice) -> Outcome:
    """One O_DIRECT pread of ``s`` under ``root``, compared with the ground truth."""
    out = Outcome(s, started=time.monotonic())
    try:
        fd = os.open(root / s.path, os.O_RDONLY | os.O_DIRECT)
        try:
            got = os.pread(fd, len(s.data), s.offset)
        finally:
            os.close(fd)
        out.wrong = got != s.data
    except OSError as e:
        out.errno = e.errno
    out.ended = time.monotonic()
    return out


# --- results -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """What happened under one fault."""

    fault: str
    expect: str
    reads: int = 0
    ok: int = 0
    eio: int = 0
    other_errors: int = 0
    wrong: int = 0
    hangs: int = 0
    crashes: int = 0
    longest_s: float = 0.0
    #: Slices still failing after the fault was lifted.
    unrecovered: int = 0
    #: Half-written files the daemon left in its cache's tmp/ (space a full disk never gets
    #: back until the next start).
    cache_leftovers: int = 0
    other_reads: int = 0
    other_bad: int = 0
    #: Faults the proxy injected (answers it damaged, tokens or signatures it refused).
    injected: int = 0
    seconds: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)

    def add(self, outcomes: Sequence[Outcome], bound: float) -> None:
        for o in outcomes:
            self.reads += 1
            self.longest_s = max(self.longest_s, round(o.seconds, 2))
            if o.ended is None or o.seconds > bound:
                self.hangs += 1
            if o.ended is None:
                continue
            if o.wrong:
                self.wrong += 1
            elif o.errno == errno.EIO:
                self.eio += 1
            elif o.errno is not None:
                self.other_errors += 1
                self.notes.append(f"{o.slice.path}@{o.slice.offset}: {os.strerror(o.errno)}")
            else:
                self.ok += 1

    def violations(self) -> list[str]:
        bad = []
        for what, n in (
            ("wrong bytes", self.wrong),
            ("hangs", self.hangs),
            ("crashes", self.crashes),
            ("errors other than EIO", self.other_errors),
            ("slices not readable after the fault", self.unrecovered),
            ("bad reads of the other layer", self.other_bad),
            ("half-written files left in the cache", self.cache_leftovers),
        ):
            if n:
                bad.append(f"{n} {what}")
        if self.expect == "ok" and self.eio:
            bad.append(f"{self.eio} EIO where retries should have succeeded")
        if self.reads == 0:
            bad.append("no read was tried")
        return bad


COLUMNS = (
    ("fault", "fault"),
    ("expect", "expect"),
    ("injected", "injected"),
    ("reads", "reads"),
    ("ok", "ok"),
    ("eio", "EIO"),
    ("wrong", "wrong"),
    ("hangs", "hangs"),
    ("crashes", "crashes"),
    ("longest_s", "longest s"),
    ("unrecovered", "unrecovered"),
    ("other", "other layer"),
    ("verdict", "verdict"),
)


def table(rows: Sequence[Row]) -> str:
    """The rows as a fixed-width text table."""
    lines = []
    cells = []
    for r in rows:
        d = dataclasses.asdict(r)
        d["other"] = f"{r.other_reads - r.other_bad}/{r.other_reads}"
        d["verdict"] = "ok" if not r.violations() else "FAIL"
        cells.append([str(d[k]) for k, _ in COLUMNS])
    heads = [h for _, h in COLUMNS]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines.append(fmt.format(*heads))
    lines.append(fmt.format(*("-" * w for w in widths)))
    lines += [fmt.format(*c) for c in cells]
    for r in rows:
        for v in r.violations():
            lines.append(f"  {r.fault}: {v}")
    return "\n".join(lines)


# --- the world the faults happen in ----------------------------------------------------------


class World:
    """Two registries (one behind the fault proxy, with a storage proxy for redirects), the
    fixture images pushed, and the ground truth; shared by every fault of a run."""

    def __init__(self, timing: Timing, read_limit: int | None) -> None:
        self.timing = timing
        self.faulted = FixtureLayer.load(*FAULTED)
        self.other = FixtureLayer.load(*OTHER)
        self.slices = self.faulted.slices(read_limit)
        self.other_slices = self.other.slices()
        self._stack = contextlib.ExitStack()
        try:
            self.registry = self._stack.enter_context(Registry.start())
            self.other_registry = self._stack.enter_context(Registry.start())
            self.registry.push_oci(self.faulted.layout, self.faulted.tag, "fault/corners:esgz")
            self.other_registry.push_oci(self.other.layout, self.other.tag, "calm/busybox:esgz")
            self.proxies = self._stack.enter_context(ProxyThread())
            self.switch = Switch()
            self.proxy = self.proxies.start(f"http://{self.registry.host}", self.switch)
            self.storage = Storage()
            self.storage_proxy = self.proxies.start(f"http://{self.registry.host}", self.storage)
        except BaseException:
            self._stack.close()
            raise

    @property
    def ref(self) -> str:
        return f"{self.proxy.netloc}/fault/corners:esgz"

    @property
    def other_ref(self) -> str:
        return self.other_registry.ref("calm/busybox:esgz")

    def close(self) -> None:
        self._stack.close()


# --- one fault -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fault:
    """``arm`` starts the fault after the layers are mounted, ``lift`` ends it (default:
    the proxy's fault hook is cleared). ``setup`` runs before the mount (an auth gate,
    redirects). ``hold``: seconds the fault lasts while reads go round (0: one pass).
    ``expect``: "ok" (retries must get every read through) or "eio" (reads may fail with
    EIO while the fault lasts)."""

    name: str
    expect: str
    arm: Callable[[Trial], None]
    lift: Callable[[Trial], None] | None = None
    setup: Callable[[Trial], None] | None = None
    hold: float = 0.0
    #: With ``hold``: one pass of reads spread over it (not the failed slices again and
    #: again), for a fault that changes while reads go on.
    spread: bool = False
    #: "" (the network), "cache-tmpfs" (the cache dir is a small tmpfs), "containerd"
    #: (the layers are mounted through containerd's rpull).
    node: str = ""
    cache_bytes: int = 0
    ci: bool = False


class Trial:
    """One fault: a fresh daemon, the two layers mounted, reads under the fault."""

    def __init__(self, world: World, fault: Fault) -> None:
        self.world = world
        self.fault = fault
        self.row = Row(fault.name, fault.expect)
        self.workdir = make_tempdir("sgz-fm-")
        self.root = self.workdir / "root"
        self.cache = self.root / "cache"
        self.daemon: StargzDaemon | None = None
        self.containerd: Containerd | None = None
        self.dirs: dict[str, Path] = {}
        self.extra: dict[str, Any] = {}

    # -- setting up

    def start(self) -> None:
        w = self.world
        w.switch.base = ()
        w.switch.fault = None
        w.storage.issued.clear()
        w.storage.expired.clear()
        w.storage.max_age = None
        if self.fault.node == "cache-tmpfs":
            self.cache.mkdir(parents=True)
            size = self.fault.cache_bytes or (64 << 20)
            run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(self.cache)])
        if self.fault.setup is not None:
            self.fault.setup(self)
        self.daemon = StargzDaemon.start(self.workdir, config_text=w.timing.config())
        if self.fault.node == "containerd":
            self.containerd = Containerd.start(self.daemon.address)
            run(
                [
                    "ctr-remote",
                    "-a",
                    self.containerd.address,
                    "-n",
                    NS,
                    "images",
                    "rpull",
                    "--plain-http",
                    w.ref,
                ],
                timeout=120,
            )
        else:
            self._prepare(w.ref, w.faulted, "sha256:" + "fa" * 32)
        self._prepare(w.other_ref, w.other, "sha256:" + "ca" * 32)
        for digest, layer in ((w.faulted.digest, "faulted"), (w.other.digest, "other")):
            found = [
                Path(mp)
                for mp, m in mounts_under(Path(self.daemon.root) / "snapshots").items()
                if m.root == "/" + digest[7:]
            ]
            if not found:
                raise HarnessError(f"{layer} layer {digest} is not mounted")
            self.dirs[layer] = found[0]

    def _prepare(self, ref: str, layer: FixtureLayer, chain: str) -> None:
        import grpc

        from stargz.service.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb

        assert self.daemon is not None
        labels = {
            "containerd.io/snapshot.ref": chain,
            "containerd.io/snapshot/remote/stargz.reference": ref,
            "containerd.io/snapshot/remote/stargz.digest": layer.digest,
            "containerd.io/snapshot/stargz/toc.digest": layer.toc_digest,
        }
        with self.daemon.channel() as ch:
            try:
                self.daemon.stub(ch).Prepare(
                    pb.PrepareSnapshotRequest(key=f"extract-{chain[7:15]} {chain}", labels=labels),
                    metadata=(("containerd-namespace", NS),),
                    timeout=60,
                )
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.ALREADY_EXISTS:  # (a remote snapshot: committed)
                    raise HarnessError(f"Prepare of {ref} {layer.digest}: {e}") from e
            else:
                raise HarnessError(f"{ref} {layer.digest} was not mounted lazily")

    # -- reading

    def read_pass(
        self, slices: Sequence[Slice], until: float | None = None, *, spread: bool = False
    ) -> list[Outcome]:
        """Read ``slices`` with READERS threads; returns every outcome, unfinished ones too
        (hangs). With ``until``: ``spread`` makes one pass last until then (a fault that
        changes mid-run meets reads all along), otherwise reads stop then, and until then
        the slices that have not read correctly are read again and again (a fault that
        lasts)."""
        root = self.dirs["faulted"]
        bound = self.world.timing.bound
        outcomes: list[Outcome] = []
        lock = threading.Lock()
        queue = list(slices)
        stop = threading.Event()
        pause = 0.0
        if until is not None and spread and slices:
            pause = (until - time.monotonic()) * READERS / len(slices)
        latest: dict[tuple[str, int], Outcome] = {}

        def worker() -> None:
            while not stop.is_set():
                with lock:
                    if until is not None and not spread:
                        if time.monotonic() >= until:
                            return  # the rest is read once the fault is gone
                        if not queue:
                            queue.extend(s for s in slices if not latest[(s.path, s.offset)].ok)
                    if not queue:
                        return
                    s = queue.pop(0)
                    o = Outcome(s, started=time.monotonic())
                    outcomes.append(o)
                    latest[(s.path, s.offset)] = o
                done = read_slice(root, s)
                o.ended, o.errno, o.wrong = done.ended, done.errno, done.wrong
                if pause:
                    time.sleep(pause)
                elif o.errno is not None and until is not None:
                    time.sleep(0.05)  # a dead registry fails fast: don't spin

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(READERS)]
        for t in threads:
            t.start()
        deadline = (until or time.monotonic()) + (len(slices) / READERS + 2) * bound
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():  # a read is stuck: give the others (and our report) a bound
                break
        stop.set()
        with lock:
            return list(outcomes)

    @contextlib.contextmanager
    def other_reader(self) -> Iterator[None]:
        """Go round the other layer's slices while the block runs."""
        stop = threading.Event()
        outcomes: list[Outcome] = []
        root = self.dirs["other"]

        def loop() -> None:
            while not stop.is_set():
                for s in self.world.other_slices:
                    if stop.is_set():
                        return
                    outcomes.append(read_slice(root, s))
                    time.sleep(0.01)

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join(self.world.timing.bound * 2)
            bound = self.world.timing.bound
            self.row.other_reads = len(outcomes) + (1 if t.is_alive() else 0)
            self.row.other_bad = sum(1 for o in outcomes if not o.ok or o.seconds > bound) + (
                1 if t.is_alive() else 0
            )

    # -- the whole trial

    def run(self) -> Row:
        t0 = time.monotonic()
        try:
            self.start()
            self._under_fault()
            self._check_daemon()
        except HarnessError as e:
            self.row.crashes += 1
            self.row.notes.append(str(e).splitlines()[0])
        finally:
            self.close()
        self.row.seconds = round(time.monotonic() - t0, 1)
        return self.row

    def _under_fault(self) -> None:
        w, f = self.world, self.fault
        bound = w.timing.bound
        with self.other_reader():
            f.arm(self)
            try:
                until = time.monotonic() + f.hold if f.hold else None
                during = self.read_pass(w.slices, until, spread=f.spread)
            finally:
                if f.lift is not None:
                    f.lift(self)
                else:
                    w.switch.fault = None
            self.row.add(during, bound)
            self.row.injected = self._injected()
            # every slice that did not read correctly, once more now the fault is gone
            good = {(o.slice.path, o.slice.offset) for o in during if o.ok}
            again = [s for s in w.slices if (s.path, s.offset) not in good]
            if again:
                after = self.read_pass(again)
                self.row.unrecovered = sum(1 for o in after if not o.ok)
                self.row.longest_s = max(
                    self.row.longest_s, max((round(o.seconds, 2) for o in after), default=0)
                )

    def _injected(self) -> int:
        x = self.extra
        if "hook" in x:
            return int(x["hook"].hits)
        if "auth" in x:
            return x["auth"].challenges
        if self.fault.setup is _redirects:
            return self.world.storage.refused
        if self.fault.node == "cache-tmpfs" and self.daemon is not None:
            return self.daemon.log_text().count("cannot write chunk")
        return int(x.get("restarts", 0))

    def _check_daemon(self) -> None:
        from stargz.service.proto.containerd.services.snapshots.v1 import snapshots_pb2 as pb

        d = self.daemon
        assert d is not None
        if not d.alive():
            raise HarnessError(f"the daemon died (exit {d.proc.returncode if d.proc else None})")
        try:
            with d.channel() as ch:
                list(d.stub(ch).List(pb.ListSnapshotsRequest(), timeout=10))
        except Exception as e:
            raise HarnessError(f"the daemon does not answer List: {e!r}") from e
        if self.containerd is not None:
            self.containerd.ctr("snapshots", "--snapshotter", "stargz", "ls", ns=NS, timeout=30)
        if self.fault.node == "cache-tmpfs":
            # files written whole are placed by a worker right after their write: give
            # those a moment; a half-written one stays, and is counted
            tmp, left = self.cache / "tmp", []
            deadline = time.monotonic() + 3
            while True:
                left = list(tmp.iterdir()) if tmp.is_dir() else []
                if not left or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            self.row.cache_leftovers = len(left)

    def close(self) -> None:
        if self.containerd is not None:
            self.containerd.close()
        if self.daemon is not None:
            code = self.daemon.stop()
            if code not in (0, None):
                self.row.crashes += 1
                self.row.notes.append(f"the daemon exited {code} on SIGTERM")
            self.daemon.close()
            log = self.daemon.log_text()
            for line in log.splitlines():
                if "Traceback" in line or '"level": "critical"' in line:
                    self.row.notes.append("the daemon logged a traceback")
                    break
        else:
            subprocess.run(["umount", "-l", str(self.cache)], check=False, capture_output=True)
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)


# --- the faults ------------------------------------------------------------------------------


def _set(hook: Callable[[Trial], Any]) -> Callable[[Trial], None]:
    def arm(t: Trial) -> None:
        t.world.switch.fault = t.extra["hook"] = hook(t)

    return arm


def _bearer(t: Trial) -> None:
    auth = BearerAuth(expires_in=300)
    t.extra["auth"] = auth
    t.world.switch.base = (auth,)


def _expire_tokens(t: Trial) -> None:
    auth: BearerAuth = t.extra["auth"]
    auth.expires_in = 1
    auth.revoke_all()
    # and keep revoking them while the reads go on

    def revoke() -> None:
        while not t.extra.get("stop_revoking"):
            time.sleep(0.7)
            auth.revoke_all()

    th = threading.Thread(target=revoke, daemon=True)
    th.start()
    t.extra["revoker"] = th


def _stop_revoking(t: Trial) -> None:
    t.extra["stop_revoking"] = True
    t.extra["revoker"].join(5)


def _redirects(t: Trial) -> None:
    w = t.world
    t.world.switch.base = (RedirectBlobs(w.storage_proxy, issued=w.storage.issued),)


def _expire_signatures(t: Trial) -> None:
    storage = t.world.storage
    storage.expired |= set(storage.issued)  # what was handed out at mount time
    storage.max_age = 1.0  # and from now on, each signature lives one second


def _down(t: Trial) -> None:
    t.world.proxies.run(t.world.proxy.down())


def _up(t: Trial) -> None:
    t.world.proxies.run(t.world.proxy.up())


def _fill_cache(t: Trial) -> None:
    """Leave the cache's tmpfs almost full, so the first chunk writes fail (ENOSPC) whatever
    the read pattern (the daemon only looks inside its own subdirectories)."""
    st = os.statvfs(t.cache)
    room = st.f_bavail * st.f_frsize - (16 << 10)
    with open(t.cache / "filler", "wb") as f:
        f.write(b"\0" * max(room, 0))


def _cache_read_only(t: Trial) -> None:
    run(["mount", "-o", "remount,ro", str(t.cache)])


def _cache_writable(t: Trial) -> None:
    run(["mount", "-o", "remount,rw", str(t.cache)])


def _restart_containerd(t: Trial) -> None:
    def restart() -> None:
        time.sleep(0.5)  # let the reads get going
        assert t.containerd is not None
        t.containerd.restart()
        t.extra["restarts"] = 1

    th = threading.Thread(target=restart, daemon=True)
    th.start()
    t.extra["restarter"] = th


def _containerd_back(t: Trial) -> None:
    t.extra["restarter"].join(60)


def _noop(t: Trial) -> None:
    pass


def faults(timing: Timing, outage_sec: float) -> list[Fault]:
    """Every fault of the matrix; those with ``ci`` make the reduced set."""
    r = timing.request_timeout_sec
    return [
        Fault("reset", "ok", _set(lambda t: PerRequest(Reset())), ci=True),
        Fault("http 500", "ok", _set(lambda t: PerRequest(Status(500)))),
        Fault("http 503 x2", "ok", _set(lambda t: PerRequest(Status(503), times=2)), ci=True),
        Fault(
            "http 429 retry-after",
            "ok",
            _set(lambda t: PerRequest(Status(429, retry_after="1"))),
            ci=True,
        ),
        Fault("stall before headers", "ok", _set(lambda t: PerRequest(Delay(r * 1.5)))),
        Fault("stall mid-body", "ok", _set(lambda t: PerRequest(Body("stall", r * 1.5))), ci=True),
        Fault("truncated body", "ok", _set(lambda t: PerRequest(Body("cut"))), ci=True),
        Fault("flipped byte", "ok", _set(lambda t: PerRegion(Body("flip"))), ci=True),
        Fault(
            "206 wrong range", "ok", _set(lambda t: PerRequest(ReshapeRange("earlier"))), ci=True
        ),
        Fault("206 short range", "ok", _set(lambda t: PerRequest(ReshapeRange("shorter")))),
        Fault(
            "token expires",
            "ok",
            _expire_tokens,
            _stop_revoking,
            setup=_bearer,
            hold=3,
            spread=True,
            ci=True,
        ),
        Fault(
            "redirect expires",
            "ok",
            _expire_signatures,
            _noop,
            setup=_redirects,
            hold=3,
            spread=True,
            ci=True,
        ),
        Fault(
            "always 503",
            "eio",
            _set(lambda t: Every(Status(503))),
            hold=min(outage_sec, 10),
        ),
        Fault(
            "always flipped",
            "eio",
            _set(lambda t: Every(Body("flip"))),
            hold=min(outage_sec, 10),
        ),
        Fault(
            "always stalls",
            "eio",
            _set(lambda t: Every(Delay(3600))),
            hold=min(outage_sec, 10),
        ),
        Fault("registry gone", "eio", _down, _up, hold=outage_sec, ci=True),
        Fault(
            "cache disk full",
            "ok",
            _noop,
            _noop,
            setup=_fill_cache,
            node="cache-tmpfs",
            cache_bytes=1 << 20,
            ci=True,
        ),
        Fault(
            "cache read-only",
            "ok",
            _cache_read_only,
            _cache_writable,
            node="cache-tmpfs",
            ci=True,
        ),
        Fault(
            "containerd restart",
            "ok",
            _restart_containerd,
            _containerd_back,
            node="containerd",
            hold=4,
            spread=True,
            ci=True,
        ),
    ]


def run_matrix(
    chosen: Sequence[Fault],
    timing: Timing,
    *,
    read_limit: int | None = None,
    progress: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Run each fault on a fresh daemon; the rows in order."""
    world = World(timing, read_limit)
    rows = []
    try:
        for f in chosen:
            row = Trial(world, f).run()
            rows.append(row)
            if progress is not None:
                progress(row)
    finally:
        world.close()
    return rows
