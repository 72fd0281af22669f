"""The FUSE library's tests run without root and without /dev/fuse: a socketpair plays
the device (`fakedev`), a toy filesystem plays the library's user (`memfs`). Each test
runs on asyncio's loop and on uvloop (the daemon's)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Coroutine[Any, Any, Any]]], Any]:
    """``run(main)``: ``main()`` on a fresh loop of the parametrized kind (30 s at most)."""
    factory = asyncio.new_event_loop if request.param == "asyncio" else uvloop.new_event_loop

    def runner(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        async def bounded() -> Any:
            return await asyncio.wait_for(main(), 30)

        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(bounded())

    return runner
