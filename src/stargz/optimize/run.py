"""``stargz optimize``: run the workload on the image, then convert with what it opened.

1. The source image (one platform) is read with `stargz.image.source.source_image`; a
   registry image's layers are downloaded into a scratch layout first
   (`stargz.image.pull`), which the final conversion then reads (no second download).
2. Each layer is made an eStargz blob to mount (a layer that already is one, by its TOC
   digest annotation, is used as it is; others are converted to a scratch file).
3. `Sandbox` mounts them through our FUSE filesystem + overlayfs; `runc` runs the workload
   (`stargz.optimize.spec`); the `AccessTrace` records first opens per layer from
   ``runc start`` until the workload exits or the period ends (SIGTERM, then SIGKILL).
4. Everything is unmounted, then `stargz.image.convert.convert` writes the image with each
   layer's files first, then ``.prefetch.landmark`` (``.no.prefetch.landmark`` for a layer
   the workload did not touch). ``record_out`` gets Go's JSON-lines record. The scratch
   dir (downloads, converted layers, the sandbox) is removed at the end, also on an error
   or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from stargz.errors import InvalidArgument
from stargz.estargz import writer
from stargz.image.convert import ConvertOptions, LayerStat, Progress, convert
from stargz.image.progress import NO_EVENTS, Events
from stargz.image.source import SourceImage, source_image
from stargz.optimize import record
from stargz.optimize.runc import Container, find_runc
from stargz.optimize.sandbox import LayerBlob, Sandbox, mounts_under
from stargz.optimize.spec import WorkloadOptions, build_spec, resolve_user

log = logging.getLogger("stargz.optimize")

TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
DEFAULT_PERIOD = 10.0


@dataclass
class OptimizeOptions:
    workload: WorkloadOptions = field(default_factory=WorkloadOptions)
    #: Seconds the workload may run (ignored with ``wait_on_signal``).
    period: float = DEFAULT_PERIOD
    #: Run until the workload exits or this process gets SIGINT (Ctrl-C).
    wait_on_signal: bool = False
    record_out: str | None = None
    convert: ConvertOptions = field(default_factory=ConvertOptions)
    #: PATH to find ``runc`` on (None: this process's PATH).
    search_path: str | None = None
    #: The platform to take from an index, ``os/arch[/variant]`` (None: this machine's).
    platform: str | None = None


@dataclass
class OptimizeResult:
    descriptor: dict[str, Any]
    stats: list[LayerStat]
    #: Layer index -> files in first-open order.
    layer_files: dict[int, list[str]]
    entries: list[record.Entry]
    #: The workload's exit code (-N: killed by signal N); None if it never exited itself.
    exit_status: int | None
    timed_out: bool


def optimize(
    src: str,
    dst: str,
    opts: OptimizeOptions,
    progress: Progress | None = None,
    *,
    events: Events = NO_EVENTS,
) -> OptimizeResult:
    """Run the workload on ``src`` (a layout or registry image) and write ``dst``."""
    runc = find_runc(opts.search_path)
    if opts.period <= 0:
        raise InvalidArgument(f"period must be positive, got {opts.period}")
    image = source_image(src, opts.platform, plain_http=opts.convert.plain_http)
    if not image.layers:
        raise InvalidArgument(f"{src} has no layers to run a workload on")
    work = tempfile.mkdtemp(prefix="stargz-optimize-")
    try:
        if image.layout is None:
            from stargz.image.pull import pull_layers

            image = pull_layers(
                image,
                os.path.join(work, "image"),
                plain_http=opts.convert.plain_http,
                jobs=opts.convert.jobs,
                events=events,
            )
        scratch = os.path.join(work, "layers")
        os.makedirs(scratch)
        blobs = [_mountable(image, d, i, scratch) for i, d in enumerate(image.layers)]
        status, timed_out, events_seen = _run_workload(runc, image, blobs, opts, work)
        shutil.rmtree(scratch, ignore_errors=True)  # not needed any more: free the disk
        index_of = {b.digest: i for i, b in enumerate(blobs)}  # a repeated layer: the top one
        entries = [
            record.Entry(e.path, image.digest, index_of[e.layer])
            for e in events_seen
            if e.layer in index_of
        ]
        desc, stats, files = _convert_in_order(
            image, dst, entries, opts.convert, opts.record_out, progress, events
        )
    finally:
        _remove(work)
    return OptimizeResult(desc, stats, files, entries, status, timed_out)


def optimize_from_trace(
    src: str,
    dst: str,
    trace: str,
    copts: ConvertOptions,
    record_out: str | None = None,
    progress: Progress | None = None,
    *,
    platform: str | None = None,
    events: Events = NO_EVENTS,
) -> OptimizeResult:
    """Convert with the files a daemon trace (file, trace dir or daemon root) recorded.
    A registry source's layers are downloaded once, by the conversion itself."""
    from stargz.optimize.fromtrace import entries_for

    image = source_image(src, platform, plain_http=copts.plain_http)
    entries = entries_for(image, trace)
    if not entries:
        raise InvalidArgument(f"the trace at {trace!r} records no file")
    desc, stats, files = _convert_in_order(image, dst, entries, copts, record_out, progress, events)
    return OptimizeResult(desc, stats, files, entries, None, False)


def _convert_in_order(
    image: SourceImage,
    dst: str,
    entries: list[record.Entry],
    copts: ConvertOptions,
    record_out: str | None,
    progress: Progress | None,
    events: Events,
) -> tuple[dict[str, Any], list[LayerStat], dict[int, list[str]]]:
    """Write the record (if asked) and convert ``image`` with each layer's recorded files
    first; returns the new descriptor, the stats and the files per layer."""
    files = record.layer_files(entries, len(image.layers))
    if record_out:
        record.write(record_out, entries)
    desc, stats = convert(
        image.convert_ref,
        dst,
        dataclasses.replace(copts, layer_files=files),
        progress,
        events=events,
        manifest=image.descriptor,
    )
    return desc, stats, files


def _mountable(image: SourceImage, desc: dict[str, Any], index: int, work: str) -> LayerBlob:
    """The layer as an eStargz blob to mount (converted into ``work`` unless it is one)."""
    digest = desc.get("digest", "")
    path = image.blob_path(digest)
    toc = (desc.get("annotations") or {}).get(TOC_DIGEST_ANNOTATION)
    if toc:
        return LayerBlob(digest, path, toc)
    out = os.path.join(work, f"layer-{index}.esgz")
    with open(path, "rb") as f, open(out, "wb") as dst:
        res = writer.build(f, dst, tmpdir=work)
    return LayerBlob(res.blob_digest, out, res.toc_digest)


@contextlib.contextmanager
def _signals(wait_on_signal: bool) -> Iterator[threading.Event]:
    """SIGINT/SIGTERM while the workload runs: set the event (the wait ends). Without
    ``wait_on_signal`` the run is then abandoned (KeyboardInterrupt after cleanup)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: object) -> None:
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _run_workload(
    runc: str, image: SourceImage, blobs: list[LayerBlob], opts: OptimizeOptions, work: str
) -> tuple[int | None, bool, list[Any]]:
    wl = opts.workload
    with Sandbox(os.path.join(work, "sandbox"), blobs) as sb:
        user = wl.user if wl.user is not None else (image.config.get("config") or {}).get("User")
        uid, gid = resolve_user(sb.rootfs, user or "")
        spec = build_spec(image.config, wl, sb.rootfs, uid, gid)
        bundle = os.path.join(work, "bundle")
        os.makedirs(bundle)
        c = Container(
            runc, os.path.join(work, "runc"), bundle, f"stargz-opt-{uuid.uuid4().hex[:12]}"
        )
        interrupted = False
        timed_out = False
        try:
            with _signals(opts.wait_on_signal) as stop:
                c.create(spec, stdin=0 if wl.terminal else None)
                sb.trace.start()
                c.start()
                log.info("workload started", extra={"pid": c.pid, "args": spec["process"]["args"]})
                period = None if opts.wait_on_signal else opts.period
                exited = c.wait(period, stop.is_set)
                if not exited:
                    interrupted = stop.is_set()
                    timed_out = not interrupted
                    c.stop()
        finally:
            sb.trace.stop()
            try:
                c.stop()
            finally:
                c.delete()
        if interrupted and not opts.wait_on_signal:
            raise KeyboardInterrupt
        return c.status, timed_out, sb.trace.events()


def _remove(work: str) -> None:
    """Delete the scratch dir, unless something is still mounted under it."""
    if mounts_under(work):
        log.warning("not removing %s: something is still mounted under it", work)
        return
    shutil.rmtree(work, ignore_errors=True)
