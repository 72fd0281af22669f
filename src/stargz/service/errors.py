"""Translate :mod:`stargz.errors` to gRPC status codes, once, at the service boundary.

The mapping is containerd's ``errdefs.ToGRPC``. The message gets containerd's suffix for
the class (``snapshot "k": not found``) so that containerd's ``FromGRPC`` shows it the way
it shows errors from the Go snapshotter.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import grpc

from stargz.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

log = logging.getLogger("stargz.service")

#: (error class, gRPC code, containerd's text for the class); first match wins.
ERROR_CODES: tuple[tuple[type[BaseException], grpc.StatusCode, str], ...] = (
    (NotFound, grpc.StatusCode.NOT_FOUND, "not found"),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS, "already exists"),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, "failed precondition"),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, "invalid argument"),
    (Unavailable, grpc.StatusCode.UNAVAILABLE, "unavailable"),
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED, "not implemented"),
)


def to_status(err: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and message for ``err``; anything unexpected is UNKNOWN."""
    for cls, code, text in ERROR_CODES:
        if isinstance(err, cls):
            msg = str(err) or text
            if msg != text and not msg.endswith(": " + text):
                msg = f"{msg}: {text}"
            return code, msg
    return grpc.StatusCode.UNKNOWN, str(err) or type(err).__name__


def grpc_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an async servicer method (unary or server-streaming) to abort with
    the mapped status. Errors outside :data:`ERROR_CODES` are logged with a traceback."""

    async def fail(context: grpc.aio.ServicerContext, err: Exception) -> None:
        code, msg = to_status(err)
        if code == grpc.StatusCode.UNKNOWN:
            log.error("unexpected error", exc_info=err, extra={"method": method.__name__})
        await context.abort(code, msg)

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as e:  # this is the one translation point
                await fail(context, e)

        return stream

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # this is the one translation point
            await fail(context, e)

    return unary
