"""``rpull``: a pull through containerd that lets the snapshotter mount layers lazily.

What ``ctr-remote i rpull`` does with containerd's Go client (``Client.Pull`` with
``WithPullUnpack`` and the stargz label handler), as calls to containerd's API:

1. a lease (``containerd.io/gc.expire`` in 24 h) that every later call joins, so the
   garbage collector keeps what the pull made until the image record refers to it;
2. the index (if any), the manifest for the platform and the config, fetched and
   verified by :mod:`stargz.remote`, written into the content store with the
   ``gc.ref.content`` labels that keep their children;
3. meanwhile (the content writes of 2. do not wait for it, nor it for them), each layer
   unpacked by :class:`stargz.containerd.unpack.Unpacker`: a remote snapshot when the
   snapshotter can mount it (nothing fetched), a normal unpack otherwise;
4. the config labelled ``containerd.io/gc.ref.snapshot.<snapshotter>=<top chain ID>``,
   then the image record (name -> index or manifest) created, or updated when it exists;
5. the lease deleted (the image record now holds everything).

``ctr run --snapshotter <snapshotter> REF`` then finds the image unpacked (its top chain
ID exists in that snapshotter) and starts without pulling again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from stargz.containerd import labels as L
from stargz.containerd.client import DEFAULT_ADDRESS, DEFAULT_NAMESPACE, ContainerdClient
from stargz.containerd.content import store_blob
from stargz.containerd.fetch import Image, PlainHTTPClient, fetch_image
from stargz.containerd.unpack import LayerResult, Unpacker, unique_part
from stargz.errors import StargzError
from stargz.remote.auth import Credentials, StaticKeychain
from stargz.remote.client import RegistryClient
from stargz.remote.manifest import Descriptor, Platform, host_platform
from stargz.remote.options import BlobOptions, ResolverOptions
from stargz.remote.reference import parse_reference
from stargz.remote.transport import DEFAULT_KEYCHAIN

log = logging.getLogger("stargz.containerd")

DEFAULT_SNAPSHOTTER = "stargz"


@dataclass(frozen=True)
class PullOptions:
    address: str = DEFAULT_ADDRESS
    namespace: str = DEFAULT_NAMESPACE
    snapshotter: str = DEFAULT_SNAPSHOTTER
    #: Plain http to the registry (always so for localhost / loopback registries).
    plain_http: bool = False
    #: Registry credentials; None: the docker config file (``~/.docker/config.json``).
    credentials: Credentials | None = None
    #: None: this host's platform.
    platform: Platform | None = None
    #: The ``stargz.prefetch`` snapshot label (a layer's landmark wins over it).
    prefetch_size: int = L.DEFAULT_PREFETCH_SIZE


@dataclass(frozen=True)
class PullResult:
    #: The image record's name.
    name: str
    target: Descriptor
    manifest: Descriptor
    #: The top snapshot: what ``ctr run`` looks for.
    chain_id: str
    layers: list[LayerResult] = field(default_factory=list)
    seconds: float = 0.0


def registry_client(
    opts: PullOptions,
    host: str,
    *,
    resolver: ResolverOptions | None = None,
    blob: BlobOptions | None = None,
) -> RegistryClient:
    """A registry client for one pull: ``opts``' credentials (else the docker config),
    plain http if asked; ``resolver``/``blob``: hosts, mirrors, CAs and retries of a
    daemon config (default: none configured)."""
    keychain = DEFAULT_KEYCHAIN
    if opts.credentials is not None:
        keychain = StaticKeychain({host: opts.credentials})
    cls = PlainHTTPClient if opts.plain_http else RegistryClient
    return cls(
        resolver=resolver,
        blob=blob,
        keychain=keychain,
        platform=opts.platform or host_platform(),
    )


async def rpull(
    ref: str,
    opts: PullOptions | None = None,
    *,
    on_layer: Callable[[LayerResult], None] | None = None,
    on_fetched: Callable[[Image], None] | None = None,
    on_manifest: Callable[[str, tuple[Descriptor, ...]], None] | None = None,
    registry: RegistryClient | None = None,
) -> PullResult:
    """Pull ``ref`` into containerd (see the module docstring). ``on_manifest(digest,
    layers)`` is called once the manifest is known (before the config is fetched),
    ``on_fetched`` once the manifest and config are, ``on_layer`` after each layer.

    ``registry``: a registry client to use (and leave open) instead of one made for this
    pull from ``opts`` (the daemon passes the one its layer mounts use, so they share its
    connections and tokens); ``opts.credentials`` and ``opts.plain_http`` are then the
    caller's business."""
    opts = opts or PullOptions()
    start = time.monotonic()
    reference = parse_reference(ref)
    name = str(reference)
    platform = opts.platform or (registry.platform if registry is not None else None)
    async with ContainerdClient(opts.address, opts.namespace) as cd:
        lease = await cd.create_lease(f"rpull-{unique_part()}", L.lease_labels())
        cd.lease = lease
        try:
            given = None if registry is None else contextlib.nullcontext(registry)
            async with given or registry_client(opts, reference.host) as reg:
                image = await fetch_image(
                    reg, reference, platform or reg.platform, on_manifest=on_manifest
                )
                if on_fetched is not None:
                    on_fetched(image)
                unpacker = Unpacker(
                    cd,
                    reg,
                    image,
                    opts.snapshotter,
                    prefetch_size=opts.prefetch_size,
                    on_layer=on_layer,
                )
                # the content writes and the layers' snapshots do not wait for each other
                # (the lease keeps both): a few containerd round trips off the first mount
                stored = asyncio.ensure_future(store_metadata(cd, image))
                try:
                    layers = await unpacker.run()
                except BaseException:
                    stored.cancel()
                    with contextlib.suppress(BaseException):
                        await stored
                    raise
                await stored
            top = unpacker.chain[-1] if unpacker.chain else ""
            if top:
                gc_label = {L.snapshot_gc_label(opts.snapshotter): top}
                await cd.update_content_labels(image.config.desc.digest, gc_label)
            await cd.put_image(name, image.target, {})
        finally:
            cd.lease = None
            try:
                await cd.delete_lease(lease)
            except StargzError as e:  # it expires by itself; the pull's own error matters more
                log.warning("could not delete lease", extra={"lease": lease, "error": str(e)})
    return PullResult(
        name=name,
        target=image.target,
        manifest=image.manifest.desc,
        chain_id=top,
        layers=layers,
        seconds=time.monotonic() - start,
    )


async def store_metadata(cd: ContainerdClient, image: Image) -> None:
    """Index, manifest and config into the content store, each labelled with its children
    (an index with all its manifests, as containerd's fetch does, not only ours)."""
    if image.index is not None:
        await store_blob(
            cd,
            image.ref,
            image.index.desc,
            image.index.raw,
            L.child_gc_labels(image.index_children),
        )
    await store_blob(
        cd,
        image.ref,
        image.manifest.desc,
        image.manifest.raw,
        L.child_gc_labels([image.config.desc, *image.layers]),
    )
    await store_blob(cd, image.ref, image.config.desc, image.config.raw)
