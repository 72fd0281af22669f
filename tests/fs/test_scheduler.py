"""The scheduler: background fetch waits for quiet."""

from __future__ import annotations

import asyncio
import time

from stargz.fs.scheduler import Scheduler


def test_scheduler_background_waits_for_quiet():
    async def main():
        s = Scheduler(1, silence=0.2, read_silence=0.05)
        order = []

        async def background():
            async with s.background():
                order.append(("bg", time.monotonic()))

        async with s.prioritized():
            task = asyncio.create_task(background())
            await asyncio.sleep(0.1)
            assert not order  # paused while a prioritized task runs
            t_end = time.monotonic()
        await task
        assert order and order[0][1] - t_end >= 0.19  # and for the quiet period after

    asyncio.run(main())
