"""`stargz.fuse.stepping.finish`: a coroutine stepped once by hand, then driven as a Task
would drive it -- results, exceptions, cancellation reaching the coroutine, timeouts
inside it, bare yields and sleeps."""

from __future__ import annotations

import asyncio

import pytest

from stargz.fuse.stepping import finish


def _first_step(coro):
    """What the session does: one ``send(None)``; returns what the coroutine waits on."""
    return coro.send(None)


def test_result_and_exception_of_the_awaited_future(run):
    async def main():
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        async def handler():
            return (await fut) * 2

        coro = handler()
        task = asyncio.ensure_future(finish(coro, _first_step(coro)))
        await asyncio.sleep(0)
        assert not task.done()
        fut.set_result(21)
        assert await task == 42

        fut2 = loop.create_future()

        async def handler2():
            try:
                await fut2
            except KeyError as e:
                return f"handled {e}"

        coro = handler2()
        task = asyncio.ensure_future(finish(coro, _first_step(coro)))
        fut2.set_exception(KeyError("k"))
        assert await task == "handled 'k'"

        fut3 = loop.create_future()

        async def handler3():
            await fut3

        coro = handler3()
        task = asyncio.ensure_future(finish(coro, _first_step(coro)))
        fut3.set_exception(OSError(5, "io"))
        with pytest.raises(OSError):
            await task

    run(main)


def test_a_cancelled_wait_reaches_the_coroutine(run):
    """Cancelling the driving task cancels what the coroutine waits on and raises
    CancelledError at its await, so its own except/finally run (as in a Task)."""

    async def main():
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        seen = []

        async def handler():
            try:
                await fut
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
            finally:
                seen.append("finally")

        coro = handler()
        task = asyncio.ensure_future(finish(coro, _first_step(coro)))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == ["cancelled", "finally"]
        assert fut.cancelled()

        # a coroutine may answer anyway
        async def stubborn():
            try:
                await loop.create_future()
            except asyncio.CancelledError:
                await asyncio.sleep(0)  # and even wait more after it
                return "answered"

        coro = stubborn()
        task = asyncio.ensure_future(finish(coro, _first_step(coro)))
        await asyncio.sleep(0)
        task.cancel()
        assert await task == "answered"

        # the awaited future cancelled by its owner: the coroutine sees CancelledError
        fut4 = loop.create_future()

        async def owner_cancels():
            try:
                await fut4
            except asyncio.CancelledError:
                return "owner cancelled"

        coro = owner_cancels()
        task = asyncio.ensure_future(finish(coro, _first_step(coro)))
        await asyncio.sleep(0)
        fut4.cancel()
        assert await task == "owner cancelled"

    run(main)


def test_a_timeout_inside_the_handler(run):
    """``asyncio.timeout`` after the first suspension: the handler gets TimeoutError (not
    a cancelled driver), and the driving task is not left cancelled."""

    async def main():
        async def handler():
            await asyncio.sleep(0)  # no task during the inline first step
            try:
                async with asyncio.timeout(0.01):
                    await asyncio.get_running_loop().create_future()
            except TimeoutError:
                return "timed out"
            return "not reached"

        coro = handler()
        task = asyncio.ensure_future(finish(coro, _first_step(coro)))
        assert await task == "timed out"
        assert task.cancelling() == 0

        async def wait_for_handler():
            try:
                await asyncio.wait_for(asyncio.sleep(10), 0.01)
            except TimeoutError:
                return "wait_for timed out"

        coro = wait_for_handler()
        assert await finish(coro, _first_step(coro)) == "wait_for timed out"

    run(main)


def test_bare_yields_sleeps_and_bad_yields(run):
    async def main():
        steps = []

        async def yields_none():
            for i in range(3):
                steps.append(i)
                await asyncio.sleep(0)  # yields None to the driver
            await asyncio.sleep(0.005)  # yields a future
            return "slept"

        coro = yields_none()
        first = _first_step(coro)
        assert first is None and steps == [0]
        assert await finish(coro, first) == "slept"
        assert steps == [0, 1, 2]

        class NotAFuture:
            def __await__(self):
                yield "not a future"

        async def bad():
            try:
                await NotAFuture()
            except RuntimeError as e:
                return str(e)

        coro = bad()
        assert "not a future" in await finish(coro, _first_step(coro))

    run(main)
