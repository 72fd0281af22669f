"""Driving a handler's coroutine that was stepped once by hand, as a Task would.

The session runs a handler's coroutine to its first suspension inline (most requests
finish there: no Task, no scheduling). Only a coroutine that suspended needs a driver,
and `finish` is that driver: it runs inside a Task and gives the coroutine what a Task
of its own would give it from then on:

- asyncio's protocol: a coroutine suspends by yielding the future it waits for (or None
  to just let the loop run once); it is resumed with ``send(None)`` once that future is
  done, and reads the future's result or exception itself;
- cancellation (the session's INTERRUPT, or ``asyncio.timeout`` expiring inside the
  handler) cancels the future the coroutine waits on and raises CancelledError at the
  coroutine's ``await``, so its ``finally``/``except`` blocks and ``asyncio.timeout``'s
  conversion to TimeoutError run; the coroutine may still answer;
- ``asyncio.current_task()`` is the driving task, so ``asyncio.timeout`` works after the
  first suspension. During the first (inline) step there is no current task: a handler
  that needs one (``asyncio.timeout``, and ``asyncio.wait_for`` from Python 3.12 on) must
  ``await asyncio.sleep(0)`` first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def finish(coro: Coroutine[Any, Any, T], waiting_on: Any) -> T:
    """The result of ``coro``, which was stepped by hand and yielded ``waiting_on``."""
    while True:
        exc: BaseException | None = None
        try:
            if waiting_on is None:
                await asyncio.sleep(0)
            elif getattr(waiting_on, "_asyncio_future_blocking", None) is None:
                # what a Task answers to a coroutine that yields something else
                exc = RuntimeError(f"a handler yielded {waiting_on!r}, not a future")
            else:
                # it was yielded to us, not to a Task: take the Task's part
                waiting_on._asyncio_future_blocking = False
                try:
                    await waiting_on
                except asyncio.CancelledError:
                    raise
                except Exception:
                    pass  # the coroutine reads the future's exception itself
        except asyncio.CancelledError as e:
            # our task was cancelled (the awaited future with it, as for a Task), or the
            # future was cancelled by its owner: the coroutine sees it at its await
            if waiting_on is not None and not waiting_on.done():
                waiting_on.cancel()
            exc = e
        try:
            waiting_on = coro.send(None) if exc is None else coro.throw(exc)
        except StopIteration as stop:
            return stop.value
