"""Convert an image to eStargz or zstd:chunked: OCI layout or registry, to either.

The converted image gets a new config (``rootfs.diff_ids`` of the new layers) and an OCI
manifest whose layer descriptors carry the annotations a lazy puller needs:
``containerd.io/snapshot/stargz/toc.digest`` and ``io.containers.estargz.uncompressed-size``
(and the two ``io.containers.zstd-chunked.*`` ones for zstd:chunked). Docker media types
become OCI ones.

- **Indexes**: every platform is converted and the index kept whole (attestation
  manifests, which describe the source image, are dropped); ``platforms`` keeps only
  those. A platform asked for that the image lacks is an error before anything is written.
- **Reuse**: a layer that already is what was asked for (gzip eStargz, or zstd:chunked
  with ``compression="zstd"``), whose TOC matches its TOC digest annotation, is kept as it
  is (``reuse=False`` converts it anyway).
- **Order of writes**: blobs, then each manifest by digest (an index after its
  manifests), and the destination tag last: a failure never leaves a tag pointing at a
  half-written image.
- **Bounds**: up to ``jobs`` layers are in flight at once (download, convert, upload).
  Blobs move through temp files in the destination's work dir, in pieces of at most
  1 MiB. A layer in flight holds on disk its compressed input, its uncompressed tar
  and its output; in memory, the writer's window of ``2 x workers`` members of at most
  ``chunk_size`` bytes each (before and after compression) plus the TOC. So memory is
  about ``jobs x 4 x workers x chunk_size`` plus TOCs, whatever the layers' sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from stargz.errors import InvalidArgument, ManifestNotFound
from stargz.estargz import writer
from stargz.image.endpoints import (
    LayoutSource,
    LayoutTarget,
    Source,
    Target,
    load_object,
    new_temp,
    sha256_of,
)
from stargz.image.layout import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MT_OCI_CONFIG,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    REF_NAME,
)
from stargz.image.progress import NO_EVENTS, Events
from stargz.image.refs import ImageLocation, LayoutLocation, RegistryLocation, parse_location
from stargz.remote.manifest import Platform

LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
}
CONFIG_TYPES = {MT_OCI_CONFIG, "application/vnd.docker.container.image.v1+json"}
#: The OCI media type of an eStargz layer, by footer kind.
_REUSE_TYPES = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
_ATTESTATION = ("vnd.docker.reference.type", "attestation-manifest")
DEFAULT_JOBS = 3


class _Cancelled(Exception):
    """Raised in a writer thread whose conversion was given up."""


@dataclass
class ConvertOptions:
    compression: str = "gzip"
    chunk_size: int = writer.DEFAULT_CHUNK_SIZE
    level: int | None = None
    prioritized_files: list[str] = field(default_factory=list)
    #: Compression threads per layer (default: cores).
    workers: int | None = None
    #: Platforms to keep from an index; empty: all of them.
    platforms: list[Platform] = field(default_factory=list)
    #: Keep layers that already are eStargz (of the asked compression) as they are.
    reuse: bool = True
    #: Layers in flight at once.
    jobs: int = DEFAULT_JOBS
    #: Talk plain http to the registries (automatic for localhost/loopback).
    plain_http: bool = False
    #: Per layer (index in the manifest's ``layers``): its files in first-access order.
    #: When set, it replaces ``prioritized_files``; a layer it does not list gets none
    #: (``.no.prefetch.landmark``). ``stargz optimize`` and ``--record-in`` fill it.
    layer_files: dict[int, list[str]] | None = None


@dataclass
class LayerStat:
    src_digest: str
    dst_digest: str
    src_size: int
    dst_size: int
    uncompressed_size: int
    seconds: float
    #: Kept as it was (already eStargz): nothing converted.
    reused: bool = False


Progress = Callable[[LayerStat], None]


def convert(
    src: str,
    dst: str,
    opts: ConvertOptions,
    progress: Progress | None = None,
    *,
    events: Events = NO_EVENTS,
    manifest: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[LayerStat]]:
    """Convert image ``src`` into ``dst`` (see :mod:`stargz.image.refs` for the forms);
    returns the new top descriptor and one stat per source layer. ``progress`` is called
    as each layer is done, ``events`` sees every step (download, convert, upload).
    ``manifest``: convert this descriptor of the source (one platform's manifest, as
    `stargz.image.source.source_image` chose it) instead of what the reference names."""
    return asyncio.run(convert_async(src, dst, opts, progress, events=events, manifest=manifest))


async def convert_async(
    src: str,
    dst: str,
    opts: ConvertOptions,
    progress: Progress | None = None,
    *,
    events: Events = NO_EVENTS,
    manifest: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[LayerStat]]:
    """:func:`convert` on a running event loop."""
    if opts.jobs < 1:
        raise InvalidArgument(f"jobs must be at least 1, got {opts.jobs}")
    sloc, dloc = parse_location(src), parse_location(dst)
    async with contextlib.AsyncExitStack() as stack:
        refs = [x.ref for x in (sloc, dloc) if isinstance(x, RegistryLocation)]
        client = None
        if refs:
            from stargz.image.registry import make_client

            client = await stack.enter_async_context(make_client(refs, plain_http=opts.plain_http))
        source = _source(sloc, client)
        stack.push_async_callback(source.close)
        desc, raw = await source.resolve()
        if manifest is not None:
            desc, raw = manifest, await source.fetch(manifest["digest"], manifest=True)
        if isinstance(dloc, LayoutLocation) and dloc.tag is None:
            # the source's tag: as written, or the tag of a layout's only image
            tag = sloc.tag if isinstance(sloc, LayoutLocation) else sloc.ref.tag
            tag = tag or (desc.get("annotations") or {}).get(REF_NAME)
            dloc = LayoutLocation(dloc.path, tag or "latest")
        target = _target(dloc, client)
        stack.push_async_callback(target.close)
        conv = _Converter(source, target, opts, progress, events)
        try:
            new, new_raw = await conv.descriptor(desc, raw, top=True)
        except BaseException:
            await conv.cancel()
            raise
        await target.tag(new, new_raw)
        return new, conv.ordered_stats()


def _source(loc: ImageLocation, client: Any) -> Source:
    if isinstance(loc, LayoutLocation):
        return LayoutSource(loc.path, loc.tag)
    from stargz.image.registry import RegistrySource

    return RegistrySource(client, loc.ref)


def _target(loc: ImageLocation, client: Any) -> Target:
    if isinstance(loc, LayoutLocation):
        assert loc.tag is not None
        return LayoutTarget(loc.path, loc.tag)
    from stargz.image.registry import RegistryTarget

    return RegistryTarget(client, loc.ref)


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _platform_str(p: Any) -> str:
    if not isinstance(p, dict):
        return "?"
    return f"{p.get('os')}/{p.get('architecture')}" + (
        f"/{p['variant']}" if p.get("variant") else ""
    )


@contextlib.contextmanager
def _temp(workdir: str) -> Iterator[BinaryIO]:
    f = new_temp(workdir)
    try:
        yield f  # type: ignore[misc]
    finally:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f.name)


_LayerKey = tuple[str, tuple[str, ...]]


class _Converter:
    def __init__(
        self,
        src: Source,
        dst: Target,
        opts: ConvertOptions,
        progress: Progress | None,
        events: Events,
    ) -> None:
        self.src, self.dst, self.opts = src, dst, opts
        self.progress, self.events = progress, events
        self.sem = asyncio.Semaphore(opts.jobs)
        # (source digest, prioritized files) -> the task converting it
        self._layers: dict[_LayerKey, asyncio.Task[tuple[dict[str, Any], str | None, LayerStat]]]
        self._layers = {}
        self._order: list[_LayerKey] = []
        self._cancelled = False

    async def cancel(self) -> None:
        """Stop every layer still in flight (after a failure) and wait for them."""
        self._cancelled = True
        for t in self._layers.values():
            t.cancel()
        await asyncio.gather(*self._layers.values(), return_exceptions=True)

    def ordered_stats(self) -> list[LayerStat]:
        return [self._layers[d].result()[2] for d in self._order]

    # --- manifests and indexes ----------------------------------------------------------

    async def descriptor(
        self, desc: dict[str, Any], raw: bytes, *, top: bool = False
    ) -> tuple[dict[str, Any], bytes]:
        mt = desc.get("mediaType")
        if mt in INDEX_TYPES:
            return await self.index(desc, raw)
        if mt in MANIFEST_TYPES:
            return await self.manifest(desc, raw, check_platform=top)
        raise InvalidArgument(
            f"{self.src.name}: {desc.get('digest')} is not an image manifest or index "
            f"(media type {mt!r})"
        )

    async def index(self, desc: dict[str, Any], raw: bytes) -> tuple[dict[str, Any], bytes]:
        idx = load_object(raw, f"index {desc['digest']}")
        entries = idx.get("manifests")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise InvalidArgument(f"{self.src.name}: index {desc['digest']} has no manifests list")
        entries = [
            e
            for e in entries
            if (e.get("annotations") or {}).get(_ATTESTATION[0]) != _ATTESTATION[1]
        ]
        if self.opts.platforms:
            chosen = []
            for want in self.opts.platforms:
                match = [e for e in entries if want.matches(e.get("platform") or {})]
                if not match:
                    have = ", ".join(_platform_str(e.get("platform")) for e in entries) or "none"
                    raise ManifestNotFound(
                        f"{self.src.name}: no manifest for platform {want} (index has: {have})"
                    )
                chosen += [e for e in match if e not in chosen]
            entries = chosen
        if not entries:
            raise InvalidArgument(f"{self.src.name}: index {desc['digest']} lists no images")
        for e in entries:
            if e.get("mediaType") not in INDEX_TYPES | MANIFEST_TYPES:
                raise InvalidArgument(
                    f"{self.src.name}: index entry {e.get('digest')} is not an image manifest "
                    f"(media type {e.get('mediaType')!r})"
                )

        async def child(e: dict[str, Any]) -> dict[str, Any]:
            craw = await self.src.fetch(e["digest"], manifest=True)
            new, _ = await self.descriptor(e, craw)
            return new

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(child(e)) for e in entries]
        out: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MT_OCI_INDEX,
            "manifests": [t.result() for t in tasks],
        }
        if idx.get("annotations"):
            out["annotations"] = idx["annotations"]
        new_raw = _dumps(out)
        digest = sha256_of(new_raw)
        await self.dst.put_manifest(new_raw, MT_OCI_INDEX, digest)
        new = {**_keep(desc), "mediaType": MT_OCI_INDEX, "digest": digest, "size": len(new_raw)}
        return new, new_raw

    async def manifest(
        self, desc: dict[str, Any], raw: bytes, *, check_platform: bool
    ) -> tuple[dict[str, Any], bytes]:
        what = f"{self.src.name}: manifest {desc['digest']}"
        man = load_object(raw, what)
        layers, cdesc = man.get("layers"), man.get("config")
        if not isinstance(layers, list) or not isinstance(cdesc, dict):
            raise InvalidArgument(f"{what} has no config or no layers list")
        if cdesc.get("mediaType") not in CONFIG_TYPES:
            raise InvalidArgument(
                f"{what} is not a container image (config media type {cdesc.get('mediaType')!r})"
            )
        for i, layer in enumerate(layers):
            if not isinstance(layer, dict) or layer.get("mediaType") not in LAYER_TYPES:
                mt = layer.get("mediaType") if isinstance(layer, dict) else None
                raise InvalidArgument(f"{what}: layer {i}: unsupported media type {mt!r}")
        config = load_object(await self.src.fetch(cdesc["digest"]), f"config {cdesc['digest']}")
        if check_platform and self.opts.platforms:
            have = {"os": config.get("os"), "architecture": config.get("architecture")}
            if config.get("variant"):
                have["variant"] = config["variant"]
            if not any(p.matches(have) for p in self.opts.platforms):
                raise ManifestNotFound(
                    f"{self.src.name} is a single {_platform_str(have)} image, not "
                    + ", ".join(str(p) for p in self.opts.platforms)
                )
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        if len(diff_ids) != len(layers):
            raise InvalidArgument(
                f"{what}: {len(layers)} layers but {len(diff_ids)} diff_ids in its config"
            )
        done = await asyncio.gather(
            *[self._layer_task(layer, self._files(i)) for i, layer in enumerate(layers)]
        )
        new_layers, new_ids = [], []
        for (new, diff_id, _), old_id in zip(done, diff_ids, strict=True):
            new_layers.append(new)
            new_ids.append(diff_id or old_id)
        config = dict(config)
        config["rootfs"] = {**(config.get("rootfs") or {}), "type": "layers", "diff_ids": new_ids}
        craw = _dumps(config)
        cdigest = sha256_of(craw)
        await self.dst.put_bytes(craw, cdigest)
        out: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": {"mediaType": MT_OCI_CONFIG, "digest": cdigest, "size": len(craw)},
            "layers": new_layers,
        }
        if man.get("annotations"):
            out["annotations"] = man["annotations"]
        new_raw = _dumps(out)
        digest = sha256_of(new_raw)
        await self.dst.put_manifest(new_raw, MT_OCI_MANIFEST, digest)
        new = {**_keep(desc), "mediaType": MT_OCI_MANIFEST, "digest": digest, "size": len(new_raw)}
        return new, new_raw

    # --- layers ---------------------------------------------------------------------------

    def _files(self, index: int) -> list[str]:
        """The files to put first in layer ``index``."""
        if self.opts.layer_files is None:
            return self.opts.prioritized_files
        return self.opts.layer_files.get(index, [])

    def _layer_task(
        self, desc: dict[str, Any], files: list[str]
    ) -> asyncio.Task[tuple[dict[str, Any], str | None, LayerStat]]:
        """One task per source layer (and file order), shared by every manifest that has it."""
        key = (desc["digest"], tuple(files))
        task = self._layers.get(key)
        if task is None:
            task = asyncio.ensure_future(self._layer(desc, files))
            self._layers[key] = task
            self._order.append(key)
        return task

    async def _layer(
        self, desc: dict[str, Any], files: list[str]
    ) -> tuple[dict[str, Any], str | None, LayerStat]:
        async with self.sem:
            start = time.perf_counter()
            want = "zstd" if self.opts.compression == "zstd" else "gzip"
            # a file order asked for (prioritized files, an optimizer's record) means a new
            # layer, whatever the source already is
            asked = bool(files) or self.opts.layer_files is not None
            if self.opts.reuse and not asked and await self.src.estargz_kind(desc) == want:
                self.events.note(desc["digest"], "reuse", "already eStargz: kept as it is")
                await self._copy_blob(desc["digest"], int(desc.get("size", 0)))
                new = {**desc, "mediaType": _REUSE_TYPES[want]}
                size = int(desc.get("size", 0))
                ann = desc.get("annotations") or {}
                usize = int(ann.get(writer.UNCOMPRESSED_SIZE_ANNOTATION) or 0)
                secs = time.perf_counter() - start
                stat = LayerStat(desc["digest"], desc["digest"], size, size, usize, secs, True)
                result: tuple[dict[str, Any], str | None, LayerStat] = (new, None, stat)
            else:
                result = await self._convert(desc, start, files)
            if self.progress:
                self.progress(result[2])
            return result

    async def _input(self, digest: str, size: int | None, stack: contextlib.ExitStack) -> str:
        """The source blob as a file on this machine (downloaded into a temp if needed)."""
        path = self.src.local_path(digest)
        if path is not None:
            return path
        f = stack.enter_context(_temp(self.dst.workdir))
        self.events.begin(digest, "download", size)
        await self.src.download(digest, size, f, lambda n: self.events.advance(digest, n))
        self.events.end(digest, "download")
        return f.name

    async def _copy_blob(self, digest: str, size: int) -> None:
        """Make the destination have the source's blob ``digest``."""
        with contextlib.ExitStack() as stack:

            async def path() -> str:
                return await self._input(digest, size, stack)

            await self._deliver(digest, digest, path, owned=False)

    async def _deliver(
        self, key: str, digest: str, path: Callable[[], Awaitable[str]], *, owned: bool
    ) -> None:
        """The destination has blob ``digest`` already, or mounts it from the source's
        repository, or gets the file ``await path()`` uploaded (progress for ``key``)."""
        if await self.dst.has_blob(digest):
            self.events.note(key, "upload", "the destination has it")
            return
        mounted = await self.dst.mount_blob(digest, self.src)
        if mounted is True:
            self.events.note(key, "upload", f"mounted from {self.src.name}")
            return
        p = await path()
        await self._put(key, p, digest, os.path.getsize(p), owned=owned, location=mounted)

    async def _put(
        self, key: str, path: str, digest: str, size: int, *, owned: bool, location: Any = None
    ) -> None:
        """Upload ``path`` as blob ``digest``; progress is reported for layer ``key``."""
        self.events.begin(key, "upload", size)
        await self.dst.put_file(
            path,
            digest,
            owned=owned,
            on_progress=lambda n: self.events.advance(key, n),
            location=location if isinstance(location, str) else None,
        )
        self.events.end(key, "upload")

    async def _convert(
        self, desc: dict[str, Any], start: float, files: list[str]
    ) -> tuple[dict[str, Any], str | None, LayerStat]:
        sdigest = desc["digest"]
        loop = asyncio.get_running_loop()

        def on_convert(done: int, total: int) -> None:
            if self._cancelled:
                raise _Cancelled  # stop the writer's thread: the conversion has failed
            loop.call_soon_threadsafe(self.events.advance, sdigest, done, total)

        with contextlib.ExitStack() as stack:
            path = await self._input(sdigest, desc.get("size"), stack)
            out = stack.enter_context(_temp(self.dst.workdir))
            self.events.begin(sdigest, "convert", None)
            res = await asyncio.to_thread(self._build, path, out, on_convert, files)
            self.events.end(sdigest, "convert")

            async def built() -> str:
                return out.name

            await self._deliver(sdigest, res.blob_digest, built, owned=True)
        annotations = {
            k: v
            for k, v in (desc.get("annotations") or {}).items()
            if not k.startswith(("containerd.io/snapshot/stargz/", "io.containers."))
        }
        annotations.update(res.annotations)
        new = {
            "mediaType": res.media_type,
            "digest": res.blob_digest,
            "size": res.blob_size,
            "annotations": annotations,
        }
        stat = LayerStat(
            sdigest,
            res.blob_digest,
            int(desc.get("size", 0)),
            res.blob_size,
            res.uncompressed_size,
            time.perf_counter() - start,
        )
        return new, res.diff_id, stat

    def _build(
        self, path: str, out: BinaryIO, on_progress: Any, files: list[str]
    ) -> writer.BuildResult:
        with open(path, "rb") as f:
            res = writer.build(
                f,
                out,
                compression=self.opts.compression,
                chunk_size=self.opts.chunk_size,
                level=self.opts.level,
                prioritized_files=files,
                allow_missing_prioritized=True,
                workers=self.opts.workers,
                tmpdir=self.dst.workdir,
                progress=on_progress,
            )
        out.flush()
        os.fsync(out.fileno())
        return res


def _keep(desc: dict[str, Any]) -> dict[str, Any]:
    """Descriptor fields that survive conversion (platform, annotations)."""
    return {k: v for k, v in desc.items() if k in ("platform", "annotations")}
