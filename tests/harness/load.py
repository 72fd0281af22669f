"""Concurrent container load over lazily pulled images, with the daemon's bounds watched.

Used by ``tests/e2e/test_load.py`` (a short run in CI) and ``benchmarks/bench_load.py``
(the long one). The pieces:

- :func:`compose`: an image stacked from components (the busybox fixture, the corners
  fixture, layers of files), each converted by our converter once, so images that share a
  component share its layer; its ground truth (path -> sha256, size of every regular file
  of the merged rootfs) comes from the components' *original* tar layers, whiteouts
  applied, never from what the daemon serves.
- :class:`LoadRun`: N containers started at once (``ctr run`` with our snapshotter), each
  running :data:`WORKLOAD` for ``duration`` s: its image's files in a fresh random order
  per pass, each hashed with busybox ``sha256sum`` and compared with the ground truth;
  it counts OK files, wrong bytes, failed reads. Meanwhile the daemon's RSS, the disk cache
  on disk (``<root>/cache``: chunk and merged files; ``tmp/`` apart) and the daemon's own
  accounting (its Prometheus endpoint) are sampled every ``interval`` s, and the page cache
  of the mounted layers' files is dropped every ``drop_every`` s (``posix_fadvise``
  DONTNEED on those files only: the FUSE open keeps the page cache, so without it every
  read after a file's first would be the kernel's, not the daemon's).

A container that has not finished ``grace`` s after its deadline is stuck (a read that
never returned): it is reported with its last progress line and killed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import tarfile
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .oci import build_image, find_manifest, stack_images
from .procs import Containerd, StargzDaemon, mounts_under, run

NS = "load"
BUSYBOX = "/bin/busybox"

#: The container's loop (busybox ash). $1 = seconds to run; /load holds ``sums`` (one
#: ``<sha256> <size> <path>`` line per file) and receives ``progress`` (every 8 files) and
#: ``result``; paths of wrong or failed files go to ``wrong`` / ``failed``, read errors to
#: ``errors``.
WORKLOAD = r"""
B=/bin/busybox
L=/load
end=$(( $($B date +%s) + $1 ))
ok=0; bad=0; err=0; bytes=0; passes=0; n=0
while [ "$($B date +%s)" -lt "$end" ]; do
  $B shuf $L/sums > $L/order
  passes=$((passes + 1))
  while read -r want size p; do
    if got=$($B sha256sum "$p" 2>>$L/errors); then
      if [ "${got%% *}" = "$want" ]; then
        ok=$((ok + 1)); bytes=$((bytes + size))
      else
        bad=$((bad + 1)); echo "$p" >> $L/wrong
      fi
    else
      err=$((err + 1)); echo "$p" >> $L/failed
    fi
    n=$((n + 1))
    if [ $((n % 8)) -eq 0 ]; then
      echo "$ok $bad $err $bytes $passes $($B date +%s)" > $L/progress
      [ "$($B date +%s)" -ge "$end" ] && break
    fi
  done < $L/order
done
echo "$ok $bad $err $bytes $passes" > $L/result
"""


# --- images ------------------------------------------------------------------------------


@dataclasses.dataclass
class Component:
    """An OCI layout with tag ``orig`` (plain tar+gzip) and ``ours`` (our converter)."""

    name: str
    layout: Path


@dataclasses.dataclass
class LoadImage:
    name: str
    layout: Path
    tag: str
    #: path (absolute in the container) -> (sha256 hex, size)
    files: dict[str, tuple[str, int]]
    layers: list[dict[str, Any]]
    ref: str = ""

    @property
    def uncompressed(self) -> int:
        return sum(size for _, size in self.files.values())


def _writable_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    return dst


def _convert(layout: Path) -> None:
    from stargz.image.convert import ConvertOptions, convert

    convert(f"oci:{layout}:orig", f"oci:{layout}:ours", ConvertOptions())


def component_from_layout(work: Path, name: str, src: Path, tag: str) -> Component:
    """A copy of the (read-only) OCI layout ``src``, its ``tag`` retagged ``orig`` and
    converted to ``ours``."""
    out = _writable_copy(src, work / name)
    if tag != "orig":
        stack_images(out, "orig", [(out, tag)])
    _convert(out)
    return Component(name, out)


def component_from_files(work: Path, name: str, files: Mapping[str, bytes]) -> Component:
    """A one-layer image of ``files`` (path -> bytes), converted."""
    out = build_image(work / name, "orig", [files])
    _convert(out)
    return Component(name, out)


def compose(work: Path, name: str, parts: Sequence[Component]) -> LoadImage:
    """Image ``name``: the ``ours`` layers of ``parts``, bottom first, and its ground truth
    from their ``orig`` layers."""
    out = stack_images(work / f"img-{name}", "ours", [(c.layout, "ours") for c in parts])
    tars = [
        c.layout / "blobs" / "sha256" / d["digest"].split(":", 1)[1]
        for c in parts
        for d in find_manifest(c.layout, "orig")["layers"]  # type: ignore[attr-defined]
    ]
    layers = list(find_manifest(out, "ours")["layers"])  # type: ignore[call-overload]
    return LoadImage(name, out, "ours", merged_regular_files(tars), layers)


def merged_regular_files(tars: Sequence[Path]) -> dict[str, tuple[str, int]]:
    """``/path`` -> (sha256, size) of every regular file of the rootfs these tar layers
    make, bottom first: whiteouts and opaque dirs applied, hardlinks resolved."""
    files: dict[str, tuple[str, int]] = {}
    for tar_path in tars:
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
            # an opaque dir hides what lower layers put below it, not this layer's entries
            for m in members:
                name = _norm(m.name)
                base = name.rsplit("/", 1)[-1]
                if base == ".wh..wh..opq":
                    _drop_below(files, name.rsplit("/", 1)[0] if "/" in name else "")
            for m in members:
                name = _norm(m.name)
                parent, _, base = name.rpartition("/")
                if base.startswith(".wh."):
                    if base != ".wh..wh..opq":
                        gone = f"{parent}/{base[4:]}" if parent else base[4:]
                        files.pop(gone, None)
                        _drop_below(files, gone)
                    continue
                if m.isreg():
                    f = tar.extractfile(m)
                    assert f is not None
                    files[name] = (hashlib.sha256(f.read()).hexdigest(), m.size)
                elif m.islnk():
                    target = files.get(_norm(m.linkname))
                    if target is not None:
                        files[name] = target
                else:
                    files.pop(name, None)
                    if not m.isdir():
                        _drop_below(files, name)
    return {"/" + p: v for p, v in files.items() if _shell_safe(p)}


def _norm(name: str) -> str:
    return name.removeprefix("./").strip("/")


def _drop_below(files: dict[str, Any], d: str) -> None:
    prefix = d + "/" if d else ""
    for p in [p for p in files if p.startswith(prefix)]:
        del files[p]


def _shell_safe(path: str) -> bool:
    """Names the workload's ``read`` gives back unchanged (it strips outer blanks and
    would end a line at a newline); the rest are left out of the ground truth."""
    return (
        path.isprintable()
        and "\\" not in path
        and path == path.strip()
        and all(part == part.strip() for part in path.split("/"))
    )


def tree_files(root: str, prefix: str, budget: int | None = None) -> dict[str, bytes]:
    """Regular files under ``root`` as ``{prefix + relpath: bytes}``, sorted walk, at most
    ``budget`` bytes (None: all)."""
    out: dict[str, bytes] = {}
    total = 0
    for dp, dns, fns in os.walk(root):
        dns.sort()
        for fn in sorted(fns):
            p = os.path.join(dp, fn)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            try:
                data = Path(p).read_bytes()
            except OSError:
                continue
            if budget is not None and total + len(data) > budget:
                return out
            out[prefix + os.path.relpath(p, root)] = data
            total += len(data)
    return out


def split_tree(root: str, n: int) -> list[list[str]]:
    """The top-level entries of ``root`` (absolute paths) in ``n`` groups of about the same
    byte size (greedy, biggest first): the trees of ``n`` distinct layers."""
    sizes = []
    for e in sorted(os.listdir(root)):
        p = os.path.join(root, e)
        if os.path.islink(p):
            continue
        if os.path.isdir(p):
            s = sum(
                os.path.getsize(os.path.join(dp, f))
                for dp, _, fns in os.walk(p)
                for f in fns
                if os.path.isfile(os.path.join(dp, f)) and not os.path.islink(os.path.join(dp, f))
            )
        else:
            s = os.path.getsize(p)
        sizes.append((s, p))
    groups: list[tuple[int, list[str]]] = [(0, []) for _ in range(n)]
    for s, p in sorted(sizes, reverse=True):
        i = min(range(n), key=lambda k: groups[k][0])
        groups[i] = (groups[i][0] + s, [*groups[i][1], p])
    return [sorted(g) for _, g in groups if g]


def files_of(paths: Sequence[str], strip: str) -> dict[str, bytes]:
    """Regular files of the trees/files ``paths``, named relative to ``strip``'s parent
    (``/usr/lib/python3.11/json`` -> ``usr/lib/python3.11/json/...``)."""
    out: dict[str, bytes] = {}
    for p in paths:
        rel = os.path.relpath(p, "/")
        if os.path.isdir(p):
            out.update(tree_files(p, rel + "/"))
        elif os.path.isfile(p):
            out[rel] = Path(p).read_bytes()
    return out


# --- sampling -----------------------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def dir_usage(path: str) -> tuple[int, int, int]:
    """(apparent bytes, bytes on disk (st_blocks), files) of the regular files below."""
    size = blocks = n = 0
    for _, st in _files_below(path):
        size += st.st_size
        blocks += st.st_blocks * 512
        n += 1
    return size, blocks, n


def _files_below(path: str) -> list[tuple[str, os.stat_result]]:
    out = []
    for dp, _, fns in os.walk(path):
        for fn in fns:
            p = os.path.join(dp, fn)
            try:
                out.append((p, os.lstat(p)))
            except OSError:  # evicted meanwhile
                continue
    return out


def cache_usage(paths: Sequence[str]) -> tuple[int, int, int, int]:
    """The cache's files at one instant: (apparent bytes, bytes on disk, files) of those
    that the walk found and that still are the same inode once it has ended, so all of
    them were on disk together at that moment (a walk of a changing tree alone counts a
    file evicted early in the walk together with one placed late: more than was ever on
    disk at once); and the walk's plain sum of apparent bytes, for comparison."""
    found = [f for path in paths for f in _files_below(path)]
    size = blocks = n = 0
    for p, st in found:
        try:
            now = os.lstat(p)
        except OSError:
            continue
        if now.st_ino == st.st_ino and now.st_dev == st.st_dev:
            size += now.st_size
            blocks += now.st_blocks * 512
            n += 1
    return size, blocks, n, sum(st.st_size for _, st in found)


_METRIC = re.compile(r"^(stargz_fs_[a-z_]+?)(?:\{[^}]*\})? ([0-9.e+-]+)$", re.MULTILINE)


def scrape(address: str) -> dict[str, float]:
    """The daemon's global ``stargz_fs_*`` metrics (unlabelled ones; labelled ones summed)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for m in _METRIC.finditer(text):
        out[m[1]] = out.get(m[1], 0.0) + float(m[2])
    return out


@dataclasses.dataclass
class Sample:
    t: float
    rss: int | None
    cache_bytes: int
    cache_disk_bytes: int
    cache_files: int
    cache_walk_bytes: int
    tmp_bytes: int
    accounted_bytes: float | None
    evictions: float | None


class Sampler(threading.Thread):
    """Samples the daemon every ``interval`` s until stopped."""

    def __init__(self, sd: StargzDaemon, metrics_address: str, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.sd = sd
        self.metrics_address = metrics_address
        self.interval = interval
        self.samples: list[Sample] = []
        self.scrape_errors = 0
        self.failure = ""
        self._stop_ev = threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> Sample:
        cache = os.path.join(self.sd.root, "cache")
        size, disk, n, walked = cache_usage(
            [os.path.join(cache, "chunks"), os.path.join(cache, "merged")]
        )
        tmp = dir_usage(os.path.join(cache, "tmp"))[0]
        acc = ev = None
        try:
            m = scrape(self.metrics_address)
            acc = m.get("stargz_fs_disk_cache_bytes")
            ev = m.get("stargz_fs_disk_cache_evictions_total")
        except OSError:
            self.scrape_errors += 1
        return Sample(
            round(time.monotonic() - self.t0, 3),
            rss_bytes(self.sd.pid),
            size,
            disk,
            n,
            walked,
            tmp,
            acc,
            ev,
        )

    def run(self) -> None:
        try:
            while not self._stop_ev.is_set():
                t = time.monotonic()
                self.samples.append(self.sample())
                self._stop_ev.wait(max(0.0, self.interval - (time.monotonic() - t)))
        except BaseException as e:  # the run's report says so (check() fails on it)
            self.failure = repr(e)
            raise

    def stop(self) -> None:
        self._stop_ev.set()
        self.join(30)


class PageCacheDropper(threading.Thread):
    """Every ``every`` s, drops the page cache of each regular file of the mounted layers
    (``posix_fadvise(DONTNEED)``), so the containers' reads keep reaching the daemon."""

    def __init__(self, snapshots: Path, every: float, skip: Sequence[str] = ()) -> None:
        super().__init__(daemon=True)
        self.snapshots = snapshots
        self.every = every
        self.skip = {d.split(":", 1)[-1] for d in skip}
        self.sweeps = 0
        self.errors = 0
        self._stop_ev = threading.Event()

    def sweep(self) -> None:
        for mp, m in mounts_under(self.snapshots).items():
            if m.fstype != "fuse.stargz" or m.root.lstrip("/") in self.skip:
                continue
            for dp, _, fns in os.walk(mp):
                if self._stop_ev.is_set():
                    return
                for fn in fns:
                    p = os.path.join(dp, fn)
                    try:
                        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                    except OSError:
                        continue
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    except OSError:
                        self.errors += 1
                    finally:
                        os.close(fd)
        self.sweeps += 1

    def run(self) -> None:
        while not self._stop_ev.wait(self.every):
            self.sweep()

    def stop(self) -> None:
        self._stop_ev.set()
        self.join(60)


# --- the run ------------------------------------------------------------------------------


def rpull(c: Containerd, ref: str) -> None:
    run(["ctr-remote", "-a", c.address, "-n", NS, "images", "rpull", "--plain-http", ref])


@dataclasses.dataclass
class ContainerResult:
    name: str
    image: str
    finished: bool
    ok: int = 0
    wrong: int = 0
    failed: int = 0
    bytes: int = 0
    passes: int = 0
    wrong_paths: list[str] = dataclasses.field(default_factory=list)
    failed_paths: list[str] = dataclasses.field(default_factory=list)
    errors: str = ""
    progress: str = ""
    exit_code: int | None = None
    stderr: str = ""


class LoadRun:
    """Containers over ``images`` (each ``image.ref`` already pushed and rpulled)."""

    def __init__(
        self,
        c: Containerd,
        sd: StargzDaemon,
        metrics_address: str,
        work: Path,
        *,
        duration: float,
        grace: float = 90,
        drop_every: float = 2.0,
        interval: float = 0.5,
        drop_skip: Sequence[str] = (),
    ) -> None:
        self.c, self.sd, self.work = c, sd, work
        self.metrics_address = metrics_address
        self.duration, self.grace = duration, grace
        self.drop_every, self.interval = drop_every, interval
        self.drop_skip = drop_skip

    def run(self, plan: Sequence[tuple[str, LoadImage]]) -> dict[str, Any]:
        """Start one container per ``(name, image)`` at once; wait; report."""
        script = self.work / "workload.sh"
        script.write_text(WORKLOAD)
        dirs: dict[str, Path] = {}
        for name, img in plan:
            d = self.work / "c" / name
            d.mkdir(parents=True)
            lines = [f"{sha} {size} {p}\n" for p, (sha, size) in sorted(img.files.items())]
            (d / "sums").write_text("".join(lines))
            shutil.copy(script, d / "workload.sh")
            dirs[name] = d
        sampler = Sampler(self.sd, self.metrics_address, self.interval)
        dropper = PageCacheDropper(
            Path(self.sd.root) / "snapshots", self.drop_every, self.drop_skip
        )
        sampler.start()
        dropper.start()
        t0 = time.monotonic()
        procs: dict[str, subprocess.Popen[bytes]] = {}
        stack = contextlib.ExitStack()
        try:
            for name, img in plan:
                procs[name] = subprocess.Popen(
                    [
                        "ctr",
                        "-a",
                        self.c.address,
                        "-n",
                        NS,
                        "run",
                        "--rm",
                        "--snapshotter",
                        "stargz",
                        "--mount",
                        f"type=bind,src={dirs[name]},dst=/load,options=rbind:rw",
                        img.ref,
                        name,
                        BUSYBOX,
                        "sh",
                        "/load/workload.sh",
                        str(int(self.duration)),
                    ],  # fmt: skip
                    stdout=subprocess.DEVNULL,
                    stderr=stack.enter_context(open(dirs[name] / "ctr.stderr", "w")),
                )
            started = time.monotonic() - t0
            deadline = t0 + self.duration + self.grace
            for p in procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(max(0.1, deadline - time.monotonic()))
            wall = time.monotonic() - t0
        finally:
            stuck = [n for n, p in procs.items() if p.poll() is None]
            for n in stuck:
                self.c.ctr("tasks", "kill", "-s", "SIGKILL", n, ns=NS, check=False)
            for p in procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(30)
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
            stack.close()
            dropper.stop()
            sampler.stop()
        results = [self._result(n, img, dirs[n], procs[n], n in stuck) for n, img in plan]
        return self._report(results, sampler, dropper, started, wall)

    @staticmethod
    def _result(
        name: str, img: LoadImage, d: Path, p: subprocess.Popen[bytes], stuck: bool
    ) -> ContainerResult:
        def text(f: str) -> str:
            try:
                return (d / f).read_text(errors="replace")
            except FileNotFoundError:
                return ""

        res = ContainerResult(name, img.name, finished=not stuck and bool(text("result")))
        res.exit_code = p.returncode
        res.stderr = text("ctr.stderr")[-2000:]
        if res.finished:
            ok, wrong, failed, nbytes, passes = (int(x) for x in text("result").split())
            res.ok, res.wrong, res.failed, res.bytes, res.passes = ok, wrong, failed, nbytes, passes
        res.progress = text("progress").strip()
        res.wrong_paths = text("wrong").splitlines()[:20]
        res.failed_paths = text("failed").splitlines()[:20]
        res.errors = text("errors")[-2000:]
        return res

    def _report(
        self,
        results: list[ContainerResult],
        sampler: Sampler,
        dropper: PageCacheDropper,
        started: float,
        wall: float,
    ) -> dict[str, Any]:
        s = sampler.samples
        rss = [x.rss for x in s if x.rss is not None]
        acc = [x.accounted_bytes for x in s if x.accounted_bytes is not None]
        ev = [x.evictions for x in s if x.evictions is not None]
        return {
            "containers": [dataclasses.asdict(r) for r in results],
            "all_finished": all(r.finished for r in results),
            "files_ok": sum(r.ok for r in results),
            "wrong": sum(r.wrong for r in results),
            "failed": sum(r.failed for r in results),
            "bytes_verified": sum(r.bytes for r in results),
            "passes": sum(r.passes for r in results),
            "start_s": round(started, 3),
            "wall_s": round(wall, 3),
            "samples": len(s),
            "rss_peak": max(rss) if rss else None,
            "rss_median": statistics.median(rss) if rss else None,
            "cache_bytes_peak": max((x.cache_bytes for x in s), default=0),
            "cache_disk_bytes_peak": max((x.cache_disk_bytes for x in s), default=0),
            "cache_tmp_bytes_peak": max((x.tmp_bytes for x in s), default=0),
            "cache_walk_bytes_peak": max((x.cache_walk_bytes for x in s), default=0),
            "cache_files_peak": max((x.cache_files for x in s), default=0),
            "accounted_bytes_peak": max(acc) if acc else None,
            "evictions_start": ev[0] if ev else None,
            "evictions_end": ev[-1] if ev else None,
            "scrape_errors": sampler.scrape_errors,
            "sampler_failure": sampler.failure,
            "page_cache_sweeps": dropper.sweeps,
            "timeline": [dataclasses.astuple(x) for x in s],
            "timeline_fields": [f.name for f in dataclasses.fields(Sample)],
        }


def pick(plan_images: Sequence[LoadImage], n: int, seed: int = 1) -> list[tuple[str, LoadImage]]:
    """``n`` container names spread round-robin over the images (order shuffled)."""
    plan = [(f"load-{i:02d}", plan_images[i % len(plan_images)]) for i in range(n)]
    random.Random(seed).shuffle(plan)
    return plan


def daemon_config(
    metrics_address: str, max_size_bytes: int, memory_bytes: int, extra: str = ""
) -> str:
    """The daemon's config for a load run: background fetch on (the default), metrics on."""
    return (
        f'metrics_address = "{metrics_address}"\n{extra}'
        f"[directory_cache]\nmax_size_bytes = {max_size_bytes}\n"
        f"max_memory_bytes = {memory_bytes}\n"
    )


def check(report: Mapping[str, Any], bound: int) -> list[str]:
    """The invariants a load run must hold, as a list of what broke (empty: all held)."""
    bad = []
    if report["sampler_failure"] or report["samples"] < 4:
        bad.append(f"the sampler failed: {report['sampler_failure'] or 'too few samples'}")
    stuck = [c["name"] for c in report["containers"] if not c["finished"]]
    if stuck:
        bad.append(f"containers that did not finish (a read never returned?): {stuck}")
    if report["wrong"]:
        bad.append(f"{report['wrong']} files read with wrong bytes")
    if report["failed"]:
        bad.append(f"{report['failed']} failed reads")
    if report["cache_bytes_peak"] > bound:
        bad.append(f"disk cache files of {report['cache_bytes_peak']} B > bound {bound}")
    if report["cache_disk_bytes_peak"] > bound:
        bad.append(f"disk cache takes {report['cache_disk_bytes_peak']} B on disk > {bound}")
    if (report["accounted_bytes_peak"] or 0) > bound:
        bad.append(f"daemon accounted {report['accounted_bytes_peak']} B > bound {bound}")
    if not (report["evictions_end"] or 0) > (report["evictions_start"] or 0):
        bad.append("no eviction happened while the containers read")
    if not report["files_ok"]:
        bad.append("no file was read")
    return bad


def dump(report: Mapping[str, Any]) -> str:
    """The report without its timeline, for an assertion message."""
    return json.dumps({k: v for k, v in report.items() if k != "timeline"}, indent=1)[-6000:]


__all__ = [
    "NS",
    "WORKLOAD",
    "Component",
    "LoadImage",
    "LoadRun",
    "check",
    "component_from_files",
    "component_from_layout",
    "compose",
    "daemon_config",
    "dump",
    "files_of",
    "merged_regular_files",
    "pick",
    "rpull",
    "scrape",
    "split_tree",
]
