"""The CRI ``ImageService`` the daemon serves for kubelet: a proxy to containerd's that
learns registry credentials on the way (`stargz.service.keychain`).

kubelet is pointed at it with ``--image-service-endpoint=unix://<socket>``. Every call to
``runtime.v1.ImageService/*`` is forwarded, as bytes, to containerd's CRI plugin at
``[cri_keychain] image_service_path`` (so RPCs and fields this daemon does not know pass
through unchanged), and containerd's answer or error status comes back as it was. Two
calls are read on the way:

- ``PullImage``: credentials in ``auth`` are learned for the image's registry host
  *before* the call is forwarded (containerd's pull asks this daemon to mount the layers,
  and the mounts need them). A malformed ``auth`` fails the call with
  ``INVALID_ARGUMENT`` naming the field, and nothing is forwarded. If containerd's pull
  fails, credentials this call replaced are put back: one pod's wrong secret must not
  cut off the running containers of another.
- ``RemoveImage``: after containerd removed the image, the hosts of the images it still
  lists are asked for, and credentials of any other host are dropped.

Credentials are never logged; only hosts and image names are.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from stargz.errors import InvalidArgument

from .keychain import CRIKeychain, image_host, parse_auth
from .proto.k8s.cri.runtime.v1 import api_pb2 as cri

log = logging.getLogger("stargz.cri")

SERVICE = "runtime.v1.ImageService"
#: Server-streaming methods of the service (every other one is unary).
_STREAMING = frozenset({"StreamImages"})


class CRIImageProxy:
    """Forwards ``runtime.v1.ImageService`` to ``backend`` (a unix socket path)."""

    def __init__(self, backend: str, keychain: CRIKeychain) -> None:
        self.backend = backend
        self.keychain = keychain
        self._channel = grpc.aio.insecure_channel(f"unix:{backend}")

    async def close(self) -> None:
        await self._channel.close()

    def handler(self) -> grpc.GenericRpcHandler:
        """The handler to add to a gRPC server (requests and answers stay bytes)."""
        return _Handler(self)

    # --- forwarding ---------------------------------------------------------------------------

    async def _call(self, method: str, request: bytes, context: Any) -> bytes:
        call = self._channel.unary_unary(f"/{SERVICE}/{method}")
        return await call(request, timeout=context.time_remaining())

    async def unary(self, method: str, request: bytes, context: Any) -> bytes:
        start = time.monotonic()
        code = grpc.StatusCode.OK
        try:
            if method == "PullImage":
                return await self._pull(request, context)
            answer = await self._call(method, request, context)
            if method == "RemoveImage":
                await self._prune(context)
            return answer
        except grpc.aio.AioRpcError as e:
            code = e.code()
            await context.abort(e.code(), e.details() or "")
            raise  # not reached: abort raises
        except InvalidArgument as e:
            code = grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, f"{method}: {e}")
            raise
        finally:
            log.debug(
                "cri rpc",
                extra={
                    "method": method,
                    "code": code.name,
                    "duration_ms": round((time.monotonic() - start) * 1000, 3),
                },
            )

    async def stream(self, method: str, request: bytes, context: Any) -> AsyncIterator[bytes]:
        call = self._channel.unary_stream(f"/{SERVICE}/{method}")
        try:
            async for item in call(request, timeout=context.time_remaining()):
                yield item
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), e.details() or "")

    # --- the two calls the keychain reads ----------------------------------------------------

    async def _pull(self, request: bytes, context: Any) -> bytes:
        try:
            req = cri.PullImageRequest.FromString(request)
        except DecodeError:
            raise InvalidArgument("the request is not a PullImageRequest") from None
        image = req.image.image
        host, learned, previous = "", None, None
        if req.HasField("auth"):
            try:
                host = image_host(image)
            except InvalidArgument:
                host = ""  # containerd names the bad reference
            if host:
                a = req.auth
                try:
                    learned = parse_auth(
                        host=host,
                        username=a.username,
                        password=a.password,
                        auth=a.auth,
                        server_address=a.server_address,
                        identity_token=a.identity_token,
                        registry_token=a.registry_token,
                    )
                except InvalidArgument as e:
                    log.warning("PullImage refused: malformed credentials", extra={
                        "image": image, "host": host, "error": str(e),
                    })  # fmt: skip
                    raise
                if learned is not None:
                    previous = await self.keychain.credentials(host)
                    self.keychain.learn(host, learned)
        try:
            answer = await self._call("PullImage", request, context)
        except grpc.aio.AioRpcError as e:
            if learned is not None and previous != learned:
                self.keychain.restore(host, learned, previous)
            log.info("PullImage failed in containerd", extra={
                "image": image, "code": e.code().name, "error": e.details(),
            })  # fmt: skip
            raise
        log.info("PullImage", extra={
            "image": image, "host": host or None, "with_credentials": learned is not None,
        })  # fmt: skip
        return answer

    async def _prune(self, context: Any) -> None:
        try:
            request = cri.ListImagesRequest().SerializeToString()
            raw = await self._call("ListImages", request, context)
        except grpc.aio.AioRpcError as e:
            log.warning("cannot list images: credentials are kept", extra={"error": e.details()})
            return
        hosts = set()
        for img in cri.ListImagesResponse.FromString(raw).images:
            for name in [*img.repo_tags, *img.repo_digests]:
                try:
                    hosts.add(image_host(name))
                except InvalidArgument:
                    continue
        self.keychain.prune(hosts)


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, proxy: CRIImageProxy) -> None:
        self.proxy = proxy

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        if service != SERVICE or not method:
            return None
        proxy = self.proxy
        if method in _STREAMING:

            async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
                async for item in proxy.stream(method, request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(stream)

        async def unary(request: bytes, context: Any) -> bytes:
            return await proxy.unary(method, request, context)

        return grpc.unary_unary_rpc_method_handler(unary)
