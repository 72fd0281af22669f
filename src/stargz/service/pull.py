"""``stargz.v1.Pull``: ``stargz rpull`` made by the running daemon.

A ``stargz rpull`` process spends most of its life importing the registry client
(aiohttp, TLS contexts) and containerd's gRPC stubs before its first request. The daemon
has them loaded, so the command asks it to pull instead and only prints what the daemon
streams back. The pull is the same code (`stargz.containerd.pull.rpull`), run as a task on
the daemon's one event loop. containerd calls back into this daemon's Snapshots service
(Stat, Prepare, Commit...) while the pull waits on containerd: both are coroutines on the
same loop, so neither blocks the other.

Registry credentials: a request's username/password are used for that pull alone and
never kept. Without them the daemon's own keychain applies (its docker config file and,
with ``[cri_keychain]``, what kubelet sent), and the manifest and config are fetched with
the registry client the daemon's layer mounts use (its connections and tokens), so the
layer mounts that follow find a warm connection. Either way the daemon's ``[resolver]``
hosts, mirrors and CAs apply (`registry_for`).

The grpc_errors decorator maps failures to the daemon's usual status codes with a
one-line message; a failed pull leaves no image record (the record is written last).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc

from stargz.errors import InvalidArgument
from stargz.remote.redact import redact_text

from .errors import grpc_errors
from .proto.stargz.v1 import pull_pb2 as pb
from .proto.stargz.v1 import pull_pb2_grpc as pb_grpc

log = logging.getLogger("stargz.service")


def pull_options(request: pb.PullRequest) -> Any:
    """The request as `stargz.containerd.pull.PullOptions`; InvalidArgument names a bad field."""
    # (imported per call: a daemon that is never asked to pull never loads the client)
    from stargz.containerd.pull import DEFAULT_SNAPSHOTTER, PullOptions
    from stargz.remote.auth import Credentials
    from stargz.remote.manifest import Platform

    if not request.ref:
        raise InvalidArgument("no image reference")
    address = request.containerd_address
    if not address or not os.path.isabs(address):
        raise InvalidArgument(f"containerd address {address!r} is not an absolute path")
    if request.password and not request.username:
        raise InvalidArgument("a registry password without a user name")
    creds = Credentials(request.username, request.password) if request.username else None
    return PullOptions(
        address=address,
        namespace=request.namespace or "default",
        snapshotter=request.snapshotter or DEFAULT_SNAPSHOTTER,
        plain_http=request.plain_http,
        credentials=creds,
        platform=Platform.parse(request.platform) if request.platform else None,
    )


def registry_for(fs: Any, opts: Any, ref: str) -> tuple[Any, bool]:
    """The registry client for this pull and whether it was made for it (and is to be
    closed after it).

    The daemon's layer mounts have one (`stargz.fs.registry.RegistryLayerSource`); the
    pull uses it too, so the mounts that follow find its connection and token, unless
    the request has credentials of its own (they are for this pull only) or asks for
    plain http to a host that client reaches over https. Then a client is made for the
    pull, with the same ``[resolver]`` and ``[blob]`` options (hosts, mirrors, CAs). A
    daemon without lazy pulling has no such client: the pull makes one as the in-process
    ``stargz rpull`` does (None: `rpull` makes and closes it)."""
    from stargz.containerd.pull import registry_client
    from stargz.remote.reference import parse_reference

    source = getattr(fs, "source", None)
    if source is None or not hasattr(type(source), "client"):
        return None, False
    shared = source.client
    plain_ok = not opts.plain_http or all(h.scheme == "http" for h in shared.hosts(ref))
    if opts.credentials is None and plain_ok:
        return shared, False
    host = parse_reference(ref).host
    own = registry_client(opts, host, resolver=shared.resolver_options, blob=shared.blob_options)
    return own, True


def first_layer_labels(
    ref: str, manifest_digest: str, layers: tuple[Any, ...], prefetch_size: int
) -> dict[str, str] | None:
    """The labels containerd will pass with the Prepare of the image's first layer (the
    pull's `Unpacker` makes the same), without the chain ID, which needs the config;
    None when the first descriptor is not a layer."""
    from stargz.containerd import labels as L
    from stargz.remote.reference import parse_reference

    if not L.is_layer(layers[0].media_type):
        return None
    name = str(parse_reference(ref))
    return L.layer_labels(name, manifest_digest, layers, 0, prefetch_size=prefetch_size)


class PullService(pb_grpc.PullServicer):
    """The servicer; ``fs`` is the daemon's FileSystem (None without lazy pulling)."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    @grpc_errors
    async def Pull(
        self, request: pb.PullRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PullEvent]:
        from stargz.containerd.pull import DEFAULT_SNAPSHOTTER, rpull

        opts = pull_options(request)
        registry, made = registry_for(self.fs, opts, request.ref)
        events: asyncio.Queue[pb.PullEvent | None] = asyncio.Queue()

        def fetched(image: Any) -> None:
            t, m = image.target, image.manifest.desc
            events.put_nowait(
                pb.PullEvent(
                    resolved=pb.ImageResolved(
                        ref=str(image.ref), digest=t.digest, media_type=t.media_type
                    )
                )
            )
            events.put_nowait(
                pb.PullEvent(manifest=pb.ManifestChosen(digest=m.digest, layers=len(image.layers)))
            )

        def layer(res: Any) -> None:
            done = pb.LayerDone(
                index=res.index,
                digest=res.digest,
                how=res.how,
                fetched=res.fetched,
                chain_id=res.chain_id,
            )
            events.put_nowait(pb.PullEvent(layer=done))

        log.info(
            "pull",
            extra={
                "ref": redact_text(request.ref),
                "namespace": opts.namespace,
                "snapshotter": opts.snapshotter,
                "shared-registry-client": registry is not None and not made,
            },
        )

        preopened: list[asyncio.Task[Any]] = []

        def manifest(digest: str, layers: tuple[Any, ...]) -> None:
            # the layer mounts use this pull's registry client: the first layer (and, from
            # its labels, the others' TOCs) can be opened before containerd asks for it.
            # Only for a pull into this daemon's snapshotter by its usual name: into another
            # snapshotter nothing would be mounted here, and the download would be wasted
            if opts.snapshotter != DEFAULT_SNAPSHOTTER or made or registry is None:
                return
            if not layers or not hasattr(self.fs, "preopen"):
                return
            labels = first_layer_labels(request.ref, digest, layers, opts.prefetch_size)
            if labels is not None:
                preopened.append(asyncio.ensure_future(self.fs.preopen(labels)))

        async def pull() -> Any:
            try:
                return await rpull(
                    request.ref,
                    opts,
                    on_layer=layer,
                    on_fetched=fetched,
                    on_manifest=manifest,
                    registry=registry,
                )
            finally:
                for t in preopened:  # mounted by now, or not needed: the hold goes
                    t.cancel()
                    with contextlib.suppress(BaseException):
                        key = await t
                        if key is not None:
                            await self.fs.release_preopened(key)
                if made:
                    await registry.close()

        task = asyncio.ensure_future(pull())
        task.add_done_callback(lambda _: events.put_nowait(None))
        try:
            while (event := await events.get()) is not None:
                yield event
            result = task.result()  # the pull's own error, if it failed
        except Exception as e:  # the requester's failure, not the daemon's: info
            log.info("pull failed", extra={"ref": redact_text(request.ref), "error": e})
            raise
        finally:
            if not task.done():  # the client went away: stop the pull (its lease goes too)
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        log.info(
            "pulled",
            extra={
                "ref": redact_text(result.name),
                "chain": result.chain_id,
                "layers": len(result.layers),
                "lazy": sum(1 for r in result.layers if r.how == "lazy"),
                "seconds": round(result.seconds, 3),
            },
        )
        yield pb.PullEvent(
            done=pb.PullDone(name=result.name, chain_id=result.chain_id, seconds=result.seconds)
        )


def add_to_server(server: grpc.aio.Server, fs: Any) -> None:
    pb_grpc.add_PullServicer_to_server(PullService(fs), server)
