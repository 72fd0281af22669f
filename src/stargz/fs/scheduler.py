"""Who goes first: prioritized work (Mount, Check, on-demand reads) before background fetch.

Go's ``task.BackgroundTaskManager``: background tasks pause while a prioritized task
runs and for a quiet period after the last one ends (5 s after Mount/Check there). Here
on-demand reads are prioritized too, with a shorter quiet period, so a container that is
reading never competes with the whole-layer download for bandwidth.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator


class Scheduler:
    def __init__(self, max_background: int, silence: float, read_silence: float) -> None:
        self._active = 0
        self._quiet_until = 0.0
        self._silence = silence
        self._read_silence = read_silence
        self._changed = asyncio.Event()
        self._background = asyncio.Semaphore(max(1, max_background))

    @contextlib.asynccontextmanager
    async def prioritized(self, *, read: bool = False) -> AsyncIterator[None]:
        """Hold background fetch back while the body runs, and for a quiet period after."""
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            quiet = self._read_silence if read else self._silence
            self._quiet_until = max(self._quiet_until, time.monotonic() + quiet)
            self._changed.set()

    def begin(self) -> None:
        """Non-context-manager form of `prioritized` for the read fast path."""
        self._active += 1

    def end(self, *, read: bool = True) -> None:
        self._active -= 1
        quiet = self._read_silence if read else self._silence
        self._quiet_until = max(self._quiet_until, time.monotonic() + quiet)

    async def wait_idle(self) -> None:
        """Return once no prioritized task runs and the quiet period has passed."""
        while True:
            if self._active == 0:
                left = self._quiet_until - time.monotonic()
                if left <= 0:
                    return
            else:
                left = 0.05
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    @contextlib.asynccontextmanager
    async def background(self) -> AsyncIterator[None]:
        """One background task slot (``max_concurrency`` of them), taken when idle."""
        async with self._background:
            await self.wait_idle()
            yield
