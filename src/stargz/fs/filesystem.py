"""`StargzFileSystem`: the `stargz.snapshot.FileSystem` the snapshotter mounts layers with.

One FUSE mount per daemon, at ``<root>/fuse``, served from ``/dev/fuse`` on the daemon's
event loop (asyncio or uvloop) by `stargz.fuse.Session`. Each mounted layer is a
subtree ``<root>/fuse/<digest hex>/``, bind-mounted (read-only) onto the snapshot
directory containerd uses as an overlayfs lower dir. A layer mounted at several snapshot
directories is opened once per source repository: layers are keyed by (repository,
digest), so a later mount of a digest never reads through another image's registry and
credentials, and each repository has its own in-flight fetch table (one image's stalling
registry can't hold up another's reads). The disk cache, holding verified chunks only,
stays shared.

``mount``: labels -> `LayerSpec` -> `LayerSource.resolve` (30 s) -> `Layer.open` (footer,
TOC, verified against the label's TOC digest) -> subtree -> bind mount -> prefetch and
background fetch start. ``check``: a connectivity check while the layer is not fully
fetched (re-resolving once from the labels on failure), then a bounded wait for the
prefetch. ``unmount``: unbind, and drop the layer when no snapshot uses it any more.

`close` ends the session and unmounts; a new instance may then start on the same root
(a daemon restart in one process, as the tests do).

With a ``handover`` (`stargz.fuse.handover`: a holder process, or systemd's fd store), the
``/dev/fuse`` descriptor is kept outside the process from the first mount on, so a
daemon that dies (or stops with ``close(unmount=False)``) leaves the mount alive: the
kernel queues requests until the next daemon takes the descriptor back in `start`,
reopens every layer in its old inode slot under its old name (`stargz.fs.slots`), asks
the kernel to resend what the dead daemon had read but not answered, and only then reads
the device. The snapshot bind mounts stay as they were (``connection_kept``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from stargz.config import Config
from stargz.errors import (
    DigestMismatch,
    FailedPrecondition,
    InvalidArgument,
    InvalidReference,
    NotFound,
    Unavailable,
)
from stargz.fs import memory, mounts, passthrough, takeover
from stargz.fs.cache import DiskCache, MemoryLRU
from stargz.fs.layer import Layer
from stargz.fs.layer_open import fetch_tail, neighbour_head_start
from stargz.fs.metrics import FsMetrics
from stargz.fs.neighbours import Neighbours, Prefetched
from stargz.fs.ops import Operations
from stargz.fs.options import FsOptions
from stargz.fs.scheduler import Scheduler
from stargz.fs.slots import SlotTable
from stargz.fs.source import STARGZ_DIGEST_LABEL, LayerSource, LayerSpec, layer_spec
from stargz.fs.trace import TRACE_DIR, ImageTracer
from stargz.fs.tree import Tree
from stargz.fuse import ROOT_INODE, Connection, Session
from stargz.fuse import mount as fuse_mount
from stargz.fuse.handover import Handover
from stargz.fuse.protocol import HAS_RESEND
from stargz.private import private_dir
from stargz.remote.reference import parse_reference

log = logging.getLogger("stargz.fs")


#: A layer table key: (source repository, layer digest).
LayerKey = tuple[str, str]


def source_of(spec: LayerSpec) -> str:
    """The repository a layer is read from (``host/repository`` of its image reference)."""
    try:
        return parse_reference(spec.ref).locator
    except InvalidReference:
        return spec.ref


@dataclass(eq=False)
class _LayerRef:
    layer: Layer
    name: bytes
    spec: LayerSpec
    key: LayerKey
    mountpoints: set[str] = field(default_factory=set)
    #: Pulls of this daemon holding the layer open before (or without) a mount (`preopen`).
    holds: int = 0


@dataclass(frozen=True)
class _MountRecord:
    digest: str
    labels: Mapping[str, str]
    key: LayerKey


class StargzFileSystem:
    """Lazily pulled eStargz layers, served through one FUSE mount under ``root``.

    ``root`` holds ``fuse/`` (the FUSE mount point) and ``cache/`` (the chunk cache; it
    survives restarts). ``source`` resolves layers (see `stargz.fs.source`).
    """

    def __init__(
        self,
        root: str,
        source: LayerSource,
        options: FsOptions | None = None,
        *,
        handover: Handover | None = None,
    ) -> None:
        self.root = os.path.abspath(root)
        self.source = source
        self.options = options or FsOptions()
        self.fuse_dir = os.path.join(self.root, "fuse")
        self.cache_dir = os.path.join(self.root, "cache")
        self.metrics = FsMetrics()
        self.memory = MemoryLRU(self.options.memory_cache_bytes)
        self.disk = DiskCache(
            self.cache_dir,
            self.options.disk_cache_max_bytes,
            self.options.max_cache_fds,
            self.metrics,
            block=None,
        )
        self.ops = Operations(self.options, self.metrics)
        self._layers: dict[LayerKey, _LayerRef] = {}
        #: Source repository -> its chunk key -> future of the chunk while being fetched.
        self._inflight: dict[str, dict[str, asyncio.Future[bytes]]] = {}
        self._mounts: dict[str, _MountRecord] = {}
        self._locks: dict[LayerKey, asyncio.Lock] = {}
        o = self.options
        #: Other layers of the images being pulled, resolved ahead of their own mount.
        self.neighbours = Neighbours(
            self._fetch_neighbour,
            self.metrics,
            parallel=o.resolve_neighbours_parallel,
            hold_sec=o.neighbour_hold_sec,
            max_bytes=o.resolve_neighbours_max_bytes,
        )
        self._executor: ThreadPoolExecutor | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._scheduler: Scheduler | None = None
        self._main: asyncio.Task[None] | None = None
        self._session: Session | None = None
        self._start_lock: asyncio.Lock | None = None
        self._started = False
        self._closed = False
        self.fuse_dev: int | None = None
        #: Keeps the FUSE descriptor outside this process (None: the mount ends with it).
        self.handover = handover
        #: True when `start` took over a live connection (its snapshot mounts are valid).
        self.connection_kept = False
        self.slots = SlotTable(os.path.join(self.root, "fuse-layers.json"))
        self._root_lock = -1
        self.read_ahead_kb: tuple[int | None, int] | None = None
        #: Close ``source`` in `close` (set by `from_config`, which made it).
        self.owns_source = False
        #: The production trace (``[trace] enable``): see `enable_trace`.
        self.tracer: ImageTracer | None = None

    @classmethod
    def from_config(
        cls,
        root: str,
        cfg: Config,
        source: LayerSource | None = None,
        *,
        handover: Handover | None = None,
    ) -> StargzFileSystem:
        """The daemon's filesystem: options from ``cfg`` (a `stargz.config.Config`), layers
        from the registry (`stargz.fs.registry.RegistryLayerSource`) unless ``source``."""
        owns = source is None
        if source is None:
            from stargz.fs.registry import RegistryLayerSource

            source = RegistryLayerSource.from_config(cfg)
        fs = cls(root, source, FsOptions.from_config(cfg), handover=handover)
        fs.owns_source = owns
        if cfg.trace.enable:
            t = cfg.trace
            fs.enable_trace(t.window_sec, t.max_files, t.max_images)
        return fs

    def enable_trace(self, window_sec: float, max_files: int, max_images: int) -> None:
        """Record, per image, the files containers open in the first ``window_sec`` after a
        layer is mounted, under ``<root>/trace`` (`stargz.fs.trace.ImageTracer`)."""
        self.tracer = ImageTracer(
            os.path.join(self.root, TRACE_DIR),
            window_sec=window_sec,
            max_files=max_files,
            max_images=max_images,
        )
        self.ops.on_open = self.tracer.opened

    def _flush_trace(self) -> None:
        if self.tracer is not None:
            try:
                self.tracer.flush()
            except OSError as e:
                log.warning("cannot write the access trace: %s", e)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the disk cache index and mount the FUSE root (idempotent)."""
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            if self._closed:
                raise FailedPrecondition("this filesystem was closed")
            loop = asyncio.get_running_loop()
            o = self.options
            self._executor = ThreadPoolExecutor(
                max_workers=max(1, o.decode_threads), thread_name_prefix="stargz-fs"
            )
            self._writer = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="stargz-cache", initializer=_background_thread
            )
            self._scheduler = Scheduler(
                o.max_concurrency, o.background_silence_sec, o.background_read_silence_sec
            )
            # the mount is allow_other: the root's 0700 is what keeps host users out of it
            await loop.run_in_executor(None, private_dir, self.root)
            await loop.run_in_executor(self._executor, self.disk.load)
            refused = await loop.run_in_executor(
                None, passthrough.init_refusal, o.passthrough, self.cache_dir
            )
            kept = None
            if self.handover is not None:
                # one server per connection: a second daemon started on this root by
                # mistake must not read requests the running one is answering
                self._root_lock = await loop.run_in_executor(None, takeover.lock_root, self.root)
                kept = await loop.run_in_executor(None, self._take_over)
            if kept is not None:
                session = Session(
                    self.ops,
                    kept,
                    on_handler_error=self._handler_error,
                    dir_handles=False,
                    splice=o.splice,
                    busy_poll_us=o.busy_poll_us,
                )
                await loop.run_in_executor(None, self.slots.load)
                self.connection_kept = True
            else:
                session = await self._mount(loop, passthrough=refused is None)
            self._session = session
            self.ops.notify_store = session.notify_store
            self.ops.passthrough = await loop.run_in_executor(
                None,
                lambda: passthrough.start(
                    o.passthrough,
                    session,
                    os.path.join(self.root, "passthrough"),
                    self._writer,
                    self.disk,
                    refused=refused,
                    ids_path=os.path.join(self.root, "passthrough-ids"),
                    inherited=self.connection_kept,
                ),
            )
            self._started = True
            try:
                if kept is not None:
                    # every layer back in its slot before the first queued request is read
                    await self._reopen_layers()
                    resent = session.resend()
                    session.start(loop)
                    log.info(
                        "FUSE connection taken over",
                        extra={
                            "mountpoint": self.fuse_dir,
                            "layers": len(self._layers),
                            "keeper": getattr(self.handover, "kind", ""),
                            "resent": resent,
                        },
                    )
                self._main = loop.create_task(self._serve(), name="stargz-fuse")
                if o.read_ahead_kb:
                    assert self.fuse_dev is not None
                    old = mounts.set_read_ahead_kb(self.fuse_dev, o.read_ahead_kb)
                    self.read_ahead_kb = (old, o.read_ahead_kb)
            except Exception:
                # (a connection taken over stays kept: the next start may do better)
                await self.close(unmount=not self.connection_kept)
                raise
            log.info(
                "FUSE mounted",
                extra={"mountpoint": self.fuse_dir, "cached_chunks": len(self.disk)},
            )

    async def _mount(self, loop: asyncio.AbstractEventLoop, *, passthrough: bool) -> Session:
        """A new FUSE mount at ``fuse_dir`` (serving at once), handed to the keeper."""
        # a daemon that died leaves a dead FUSE mount ("transport endpoint is not connected")
        await loop.run_in_executor(None, _detach_all, self.fuse_dir)
        await loop.run_in_executor(None, private_dir, self.fuse_dir)
        await loop.run_in_executor(None, self.slots.reset)
        # read-only, nosuid, nodev, allow_other and default_permissions: the kernel
        # checks mode bits itself, so a host user who can reach the mount reads only
        # what the layer's modes allow
        splice = self.options.splice
        conn = await loop.run_in_executor(
            None, lambda: fuse_mount(self.fuse_dir, passthrough=passthrough, splice=splice)
        )
        session = Session(
            self.ops,
            conn,
            on_handler_error=self._handler_error,
            dir_handles=False,
            splice=splice,
            busy_poll_us=self.options.busy_poll_us,
        )
        try:
            dev = await loop.run_in_executor(None, takeover.mount_dev, self.fuse_dir)
            if dev is None:
                raise OSError(errno.ENOENT, f"{self.fuse_dir} is not in the mount table")
            self.fuse_dev = dev
            if self.handover is not None:
                state = takeover.state_of(conn, dev)
                try:
                    await loop.run_in_executor(None, self.handover.keep, conn.fd, state)
                except OSError as e:
                    # serving matters more than surviving the next restart
                    log.warning(
                        "cannot keep the FUSE connection outside the daemon: a restart "
                        "will end the mounts of running containers",
                        extra={"keeper": getattr(self.handover, "kind", ""), "error": str(e)},
                    )
                    self.handover = None
        except BaseException:
            session.close()
            raise
        session.start(loop)
        return session

    def _take_over(self) -> Connection | None:
        """The kept connection if it still serves ``fuse_dir``; otherwise let it go (the
        mount is then made anew)."""
        assert self.handover is not None
        kept = self.handover.take()
        if kept is None:
            return None
        checked = takeover.check(kept, self.fuse_dir)
        if isinstance(checked, str):
            log.warning("not taking over the kept FUSE connection: %s", checked)
            os.close(kept.fd)
            self.handover.release()
            return None
        conn, self.fuse_dev = checked
        return conn

    async def _reopen_layers(self) -> None:
        """Open again, in their old slots, the layers the previous daemon showed."""
        records = list(self.slots.layers.items())

        async def one(key: str, labels: Mapping[str, str]) -> None:
            try:
                await self._acquire(self._spec(labels), labels)
            except Exception as e:
                # its slot stays reserved: a later mount of it (the snapshotter's restore)
                # tries again; meanwhile its inodes answer ENOENT/EIO
                log.error(
                    "cannot reopen a layer of the kept FUSE connection",
                    extra={"layer": key, "error": str(e)},
                )

        await asyncio.gather(*(one(k, r.labels) for k, r in records))

    def _handler_error(self, opcode: int) -> None:
        self.metrics.handler_errors += 1

    async def _serve(self) -> None:
        assert self._session is not None
        try:
            await self._session.wait()
        except asyncio.CancelledError:
            raise
        except BaseException:
            log.critical("the FUSE main loop stopped with an error", exc_info=True)
            raise

    async def close(self, *, unmount: bool = True) -> None:
        """Stop serving. With ``unmount``, unbind every snapshot mount first and end the
        FUSE connection; without, a ``handover`` keeps the connection for the next start
        (otherwise it ends with this process)."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await self.neighbours.close()
        self._flush_trace()
        if unmount:
            for mp in list(self._mounts):
                try:
                    await loop.run_in_executor(None, mounts.unmount_robust, mp)
                except OSError as e:
                    log.warning("cannot unmount %s: %s", mp, e)
            self._mounts.clear()
        keep = self.handover is not None and not unmount
        session = self._session
        if keep and session is not None:
            if not session.conn.offered & HAS_RESEND:
                # a kernel before 6.9 cannot resend what we leave unanswered: let the
                # reads that wait for a fetch finish first (bounded)
                deadline = loop.time() + KEEP_DRAIN_SEC
                while session.in_flight and loop.time() < deadline:
                    await asyncio.sleep(0.01)
            # stop answering before the layers close: a read failing with LayerClosed
            # must stay unanswered (the next daemon answers it), never become an EIO
            session.close(keep_mount=True)
        for ref in list(self._layers.values()):
            await ref.layer.close()
        self._layers.clear()
        if self.ops.passthrough is not None:
            self.ops.passthrough.close()
        if self._session is not None:
            self.ops.notify_store = self.ops.passthrough = None
            self._session.close(keep_mount=keep)
            if self._main is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(self._main), 10)
                except (TimeoutError, Exception):
                    self._main.cancel()
            if not keep:
                await loop.run_in_executor(None, _detach_all, self.fuse_dir)
        if self.handover is not None and not keep:
            # nothing to hand on: the keeper's copy would keep a mount nobody serves
            await loop.run_in_executor(None, self.handover.release)
        if self._root_lock >= 0:
            os.close(self._root_lock)  # (after the session: its fd is handed on by now)
            self._root_lock = -1
        # the writes in flight finish, then the files they wrote are placed and committed
        # (on this loop), and only then does the cache close: a next start clears tmp/
        if self._writer is not None:
            await loop.run_in_executor(None, self._writer.shutdown)
        await self.disk.drain()
        self.disk.close()
        if self._executor is not None:
            await loop.run_in_executor(None, self._executor.shutdown)
        if self.owns_source:
            closer = getattr(self.source, "close", None)
            if closer is not None:
                res = closer()
                if asyncio.iscoroutine(res):
                    await res

    # --- FileSystem protocol -----------------------------------------------------------------

    def _spec(self, labels: Mapping[str, str]) -> LayerSpec:
        return layer_spec(
            labels,
            disable_verification=self.options.disable_verification,
            allow_no_verification=self.options.allow_no_verification,
        )

    async def mount(self, mountpoint: str, labels: Mapping[str, str]) -> None:
        """Make the layer named by ``labels`` appear (read-only) at ``mountpoint``."""
        t0 = time.monotonic()
        mp = _norm(mountpoint)
        try:
            spec = self._spec(labels)
            if mp in self._mounts:
                raise FailedPrecondition(f"{mountpoint} is already a stargz mount")
            await self.start()
            assert self._scheduler is not None
            log.debug("mounting a layer", extra={"mountpoint": mp, "layer": spec.digest})
            self._start_neighbours(spec, labels)
            async with self._scheduler.prioritized():
                ref = await self._acquire(spec, labels)
                try:
                    src = os.path.join(self.fuse_dir, ref.name.decode())
                    loop = asyncio.get_running_loop()
                    if not (
                        self.connection_kept
                        and await loop.run_in_executor(
                            None, takeover.bound, mp, self.fuse_dev, "/" + ref.name.decode()
                        )
                    ):
                        await loop.run_in_executor(None, _bind, src, mp)
                except BaseException:
                    await self._release(ref)
                    raise
                ref.mountpoints.add(mp)
                self._mounts[mp] = _MountRecord(spec.digest, dict(labels), ref.key)
            if self.options.wait_prefetch_on_mount:
                await self._wait_prefetch(ref.layer)
        except BaseException:
            self.metrics.mount_failures += 1
            raise
        self.metrics.mounts += 1
        if self.tracer is not None:
            self.tracer.mounted(spec.digest, spec.ref)
            asyncio.get_running_loop().call_later(self.tracer.window_sec + 0.5, self._flush_trace)
        log.info(
            "layer mounted",
            extra={
                "mountpoint": mp,
                "layer": spec.digest,
                "ref": spec.ref,
                "seconds": round(time.monotonic() - t0, 4),
                **{
                    k: round(getattr(ref.layer.metrics, k), 4)
                    for k in (
                        "resolve_seconds",
                        "open_fetch_seconds",
                        "open_parse_seconds",
                        "tree_seconds",
                    )
                },
            },
        )

    async def preopen(self, labels: Mapping[str, str]) -> LayerKey | None:
        """Open the layer named by ``labels`` before containerd asks to mount it, and hold
        it open until `release_preopened` (the key returned).

        A pull this daemon makes knows the image's layers once it has the manifest, while
        containerd's first Prepare comes only after the config and a few containerd calls:
        opening then (footer, TOC, the prefetch's head start, the neighbours' TOCs) starts
        every download a round trip or more sooner, and the Prepare finds the layer open or
        opening. A failure is logged only: the mount tries again and reports it.
        """
        try:
            spec = self._spec(labels)
            await self.start()
            assert self._scheduler is not None
            self._start_neighbours(spec, labels)
            async with self._scheduler.prioritized():
                ref = await self._acquire(spec, labels)
        except Exception as e:
            log.info(
                "cannot open a layer ahead of its mount; the mount will try",
                extra={"layer": labels.get(STARGZ_DIGEST_LABEL, "?"), "error": str(e)},
            )
            return None
        ref.holds += 1
        log.info("layer opened ahead of its mount", extra={"layer": spec.digest})
        return ref.key

    def _start_neighbours(self, spec: LayerSpec, labels: Mapping[str, str]) -> None:
        """Start pre-resolving the other layers ``spec``'s labels name (`Neighbours`)."""
        if self.options.resolve_neighbours and spec.neighbours:
            self.neighbours.start(
                source_of(spec), spec.ref, spec.neighbours, labels, self._open_or_opening
            )

    async def release_preopened(self, key: LayerKey) -> None:
        """Drop `preopen`'s hold: the layer closes unless it is mounted."""
        ref = self._layers.get(key)
        if ref is not None and ref.holds > 0:
            ref.holds -= 1
            await self._release(ref)

    async def _acquire(self, spec: LayerSpec, labels: Mapping[str, str]) -> _LayerRef:
        source = source_of(spec)
        key = (source, spec.digest)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            ref = self._layers.get(key)
            if ref is not None:
                if spec.toc_digest is not None and spec.toc_digest != ref.layer.reader.toc_digest:
                    raise DigestMismatch(
                        f"TOC digest mismatch for {spec.digest}: the label says "
                        f"{spec.toc_digest}, the mounted layer has {ref.layer.reader.toc_digest}"
                    )
                return ref
            o = self.options
            t0 = time.monotonic()
            pre = await self.neighbours.take(key) if o.resolve_neighbours else None
            if pre is not None:
                blob: Any = pre.blob
            else:
                try:
                    blob = await asyncio.wait_for(
                        self.source.resolve(spec.ref, spec.digest, labels), o.resolve_timeout_sec
                    )
                except TimeoutError:
                    raise Unavailable(
                        f"resolving {spec.ref} {spec.digest} took more than "
                        f"{o.resolve_timeout_sec} s"
                    ) from None
            assert self._executor is not None and self._scheduler is not None
            t_resolved = time.monotonic()
            layer: Layer | None = None
            try:
                layer = await Layer.open(
                    spec.digest,
                    blob,
                    toc_digest=spec.toc_digest,
                    verify=not o.disable_verification and spec.toc_digest is not None,
                    options=o,
                    memory=self.memory,
                    disk=self.disk,
                    executor=self._executor,
                    scheduler=self._scheduler,
                    inflight=self._inflight.setdefault(source, {}),
                    writer=self._writer,
                    cache_scope=source,
                    tail=pre.tail if pre is not None else None,
                )
                tree = await asyncio.get_running_loop().run_in_executor(
                    self._executor, Tree, layer.reader, o.opaque_xattr
                )
                layer.metrics.resolve_seconds = t_resolved - t0
                layer.metrics.tree_seconds = (
                    time.monotonic() - t_resolved - layer.metrics.open_seconds
                )
            except BaseException:
                if layer is not None:
                    await layer.close()
                    blob = None
                closer = getattr(blob, "close", None)
                if closer is not None:
                    res = closer()
                    if asyncio.iscoroutine(res):
                        await res
                raise
            # the parsed TOC is garbage now: give its pages back (off the mount's path)
            asyncio.get_running_loop().run_in_executor(self._executor, memory.trim)
            # the slot (and name) are recorded before the layer is visible: a daemon that
            # takes the connection over must show it in the same slot under the same name
            rec = self.slots.get(_slot_key(key))
            if rec is None:
                name = spec.digest.partition(":")[2].encode()
                if name in self.ops.names or self.slots.has_name(name.decode()):
                    # the same layer from another repository
                    name += b"-" + hashlib.sha256(source.encode()).hexdigest()[:16].encode()
                rec = self.slots.add(_slot_key(key), name.decode(), labels)
            name = rec.name.encode()
            self.ops.add(name, layer, tree, rec.slot)
            if self._session is not None:
                # the kernel keeps listings of the FUSE root too: show the new layer
                await asyncio.get_running_loop().run_in_executor(
                    None, self._session.invalidate_inode, ROOT_INODE
                )
            ref = _LayerRef(layer, name, spec, key)
            self._layers[key] = ref
            layer.start_prefetch(self._prefetch_size(layer, spec))
            if not o.no_background_fetch:
                layer.start_background_fetch()
            return ref

    def _open_or_opening(self, key: LayerKey) -> bool:
        lock = self._locks.get(key)
        return key in self._layers or (lock is not None and lock.locked())

    async def _fetch_neighbour(
        self, ref: str, digest: str, labels: Mapping[str, str]
    ) -> Prefetched:
        """Resolve a neighbour layer and fetch its footer + TOC (see `stargz.fs.neighbours`)."""
        o = self.options
        try:
            blob = await asyncio.wait_for(
                self.source.resolve(ref, digest, labels), o.resolve_timeout_sec
            )
        except TimeoutError:
            raise Unavailable(
                f"resolving {ref} {digest} took more than {o.resolve_timeout_sec} s"
            ) from None
        assert self._executor is not None
        # a TOC that could never be held is not fetched ahead (its own mount fetches it)
        bounds = [b for b in (o.max_toc_bytes, o.resolve_neighbours_max_bytes) if b > 0]
        try:
            start, data, fetched = await fetch_tail(
                blob, digest, self.disk, self._executor, min(bounds, default=0)
            )
        except BaseException:
            closer = getattr(blob, "close", None)
            if closer is not None:
                res = closer()
                if asyncio.iscoroutine(res):
                    await res
            raise
        got = Prefetched(blob, start, data, fetched)
        # its prefetch can start now, not when containerd gets to its Prepare (a TOC from
        # the disk cache means its chunks are likely there too: nothing to start)
        room = o.resolve_neighbours_max_bytes - self.neighbours.held_bytes - len(data)
        if fetched and not o.noprefetch and o.head_start_max_bytes > 0 and room > 0:
            head = neighbour_head_start(
                blob, data, min(o.head_start_max_bytes, room), o.head_start_streams
            )
            if head is not None:
                got.blob, got.head_bytes = head, head.head_size
        return got

    def _prefetch_size(self, layer: Layer, spec: LayerSpec) -> int:
        if self.options.noprefetch:
            return 0
        landmark = layer.reader.prefetch_size
        if landmark is not None:
            return landmark
        if spec.prefetch_size is not None:
            return spec.prefetch_size
        return self.options.prefetch_size

    async def _release(self, ref: _LayerRef, mp: str | None = None) -> None:
        if mp is not None:
            ref.mountpoints.discard(mp)
        if ref.mountpoints or ref.holds:
            return
        self._layers.pop(ref.key, None)
        self.metrics.closed_layers_verification_failures += ref.layer.metrics.verification_failures
        self.ops.remove(ref.name)
        self.slots.remove(_slot_key(ref.key))
        if self._session is not None and not self._closed:
            # in a worker thread: the kernel may need a request answered meanwhile
            asyncio.get_running_loop().run_in_executor(None, self._forget_root_entry, ref.name)
        await ref.layer.close()
        # (after the close: it takes the layer's fetches off the table)
        source = ref.key[0]
        if not self._inflight.get(source, True) and all(k[0] != source for k in self._layers):
            del self._inflight[source]

    def _forget_root_entry(self, name: bytes) -> None:
        """The kernel forgets a removed layer's entry and its cached listing of the root."""
        session = self._session
        if session is not None:
            session.invalidate_entry(ROOT_INODE, name)
            session.invalidate_inode(ROOT_INODE)

    async def _wait_prefetch(self, layer: Layer) -> None:
        o = self.options
        if o.noprefetch or layer.prefetch_done.is_set():
            return
        if o.prefetch_async_size and layer.prefetch_size > o.prefetch_async_size:
            return
        try:
            await asyncio.wait_for(
                asyncio.shield(layer.prefetch_done.wait()), o.prefetch_timeout_sec
            )
        except TimeoutError:
            log.warning(
                "prefetch did not finish in time; going on without it",
                extra={"layer": layer.digest, "timeout": o.prefetch_timeout_sec},
            )

    async def check(self, mountpoint: str, labels: Mapping[str, str]) -> None:
        """Raise Unavailable if the layer at ``mountpoint`` can no longer serve reads."""
        self.metrics.checks += 1
        mp = _norm(mountpoint)
        rec = self._mounts.get(mp)
        ref = self._layers.get(rec.key) if rec is not None else None
        if ref is None:
            self.metrics.check_failures += 1
            raise Unavailable(f"{mountpoint} is not a mounted stargz layer")
        layer = ref.layer
        assert self._scheduler is not None
        try:
            async with self._scheduler.prioritized():
                # (the clock first: fully_fetched walks every member of the layer)
                if (
                    time.monotonic() - layer.last_check >= self.options.valid_interval
                    and not layer.fully_fetched
                ):
                    await self._check_blob(ref, labels or rec.labels)
                if self.options.wait_prefetch_on_check:
                    await self._wait_prefetch(layer)
        except BaseException:
            self.metrics.check_failures += 1
            raise

    async def _check_blob(self, ref: _LayerRef, labels: Mapping[str, str]) -> None:
        layer = ref.layer
        try:
            await layer.blob.check()
        except Exception as first:
            log.info(
                "layer connectivity check failed; re-resolving",
                extra={"layer": layer.digest, "error": str(first)},
            )
            forget = getattr(self.source, "forget", None)
            if forget is not None:
                forget(ref.spec.ref, ref.spec.digest)
            try:
                blob = await asyncio.wait_for(
                    self.source.resolve(ref.spec.ref, ref.spec.digest, labels),
                    self.options.resolve_timeout_sec,
                )
                await blob.check()
            except Exception as e:
                layer.metrics.note_error(f"connectivity check failed: {e}")
                raise Unavailable(f"layer {layer.digest} is unreachable: {e}") from e
            if blob.size != layer.size:
                raise Unavailable(
                    f"layer {layer.digest} re-resolved to a blob of {blob.size} bytes, "
                    f"not {layer.size}"
                ) from None
            old, layer.blob = layer.blob, blob
            closer = getattr(old, "close", None)
            if closer is not None:
                res = closer()
                if asyncio.iscoroutine(res):
                    await res
        layer.last_check = time.monotonic()

    async def unmount(self, mountpoint: str) -> None:
        """Unbind ``mountpoint``; tolerate one that is not mounted."""
        mp = _norm(mountpoint)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, mounts.unmount_robust, mp)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOENT):
                raise
        rec = self._mounts.pop(mp, None)
        if rec is None:
            return
        self.metrics.unmounts += 1
        ref = self._layers.get(rec.key)
        if ref is not None:
            await self._release(ref, mp)

    # --- introspection -----------------------------------------------------------------------

    def _ref(self, digest_or_mountpoint: str) -> _LayerRef:
        rec = self._mounts.get(_norm(digest_or_mountpoint))
        if rec is not None and rec.key in self._layers:
            return self._layers[rec.key]
        for ref in self._layers.values():  # (the first opened, if several sources have it)
            if ref.layer.digest == digest_or_mountpoint:
                return ref
        raise NotFound(f"no mounted layer {digest_or_mountpoint!r}")

    def layer(self, digest_or_mountpoint: str) -> Layer:
        """The open layer mounted at this path, or with this digest."""
        return self._ref(digest_or_mountpoint).layer

    def subtree(self, digest_or_mountpoint: str) -> str:
        """The layer's directory inside the FUSE mount."""
        return os.path.join(self.fuse_dir, self._ref(digest_or_mountpoint).name.decode())

    @property
    def splice_counts(self) -> tuple[bool, int, int]:
        """Whether READ answers are spliced (``[fuse] splice``, until a failure turns it
        off), how many were, and how many fell back to a copy after a splice failed."""
        s = self._session
        if s is None:
            return False, 0, 0
        return s.splice, s.spliced, s.splice_fallbacks

    @property
    def mountpoints(self) -> dict[str, str]:
        """Snapshot mount point -> layer digest."""
        return {mp: rec.digest for mp, rec in self._mounts.items()}

    def layer_metrics(self) -> dict[str, dict[str, Any]]:
        return {r.layer.digest: r.layer.metrics.as_dict() for r in self._layers.values()}

    def layer_status(self) -> list[tuple[Layer, str, str, tuple[str, ...]]]:
        """Every open layer with its image reference, its source repository and the
        snapshot mount points it is bound to (for ``stargz status``; call it on the event
        loop thread)."""
        return [
            (r.layer, r.spec.ref, r.key[0], tuple(sorted(r.mountpoints)))
            for r in self._layers.values()
        ]

    def open_layers(self) -> list[tuple[Layer, tuple[str, ...]]]:
        """Every open layer with the snapshot mount points it is bound to (for the
        metrics exporter; call it on the event loop thread)."""
        return [(r.layer, tuple(sorted(r.mountpoints))) for r in self._layers.values()]


#: How long a stop that keeps the FUSE connection waits for requests still being answered,
#: on a kernel that cannot resend them to the next daemon.
KEEP_DRAIN_SEC = 10.0

#: CPU niceness of the cache-writer thread. Its work (thousands of small chunk files after
#: a prefetch) is never waited for by a read, and it used to compete for the CPU with the
#: container that just started (measured: ~0.45 s of writer time during a gcc HelloBench run).
WRITER_NICENESS = 10


def _background_thread() -> None:
    """Lower this thread's CPU priority (Linux threads are tasks with their own nice)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)


def _slot_key(key: LayerKey) -> str:
    return f"{key[0]} {key[1]}"


def _norm(path: str) -> str:
    """An absolute, normalized path, computed without touching the filesystem.

    Never ``os.path.realpath`` here: it stats each component, and a stat of a path inside
    our own mount, made on the thread that serves FUSE, waits for itself forever.
    """
    return os.path.normpath(os.path.abspath(path))


def _bind(src: str, mp: str) -> None:
    # a bind left by a daemon that died is dead ("transport endpoint is not connected"):
    # take it off before mounting again
    _detach_all(mp)
    mounts.bind_mount(src, mp)


def _detach_all(path: str) -> None:
    """Lazily unmount whatever is mounted at ``path`` (repeatedly: mounts can stack)."""
    for _ in range(8):
        try:
            if not mounts.unmount(path, mounts.MNT_DETACH):
                return
        except OSError:
            return


__all__ = ["InvalidArgument", "StargzFileSystem"]
