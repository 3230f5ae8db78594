"""Counts event-loop ticks, to show that work under test never blocks the loop."""

import asyncio


class LoopTicks:
    """While running, `count` goes up every 10 ms that the loop is free."""

    def __init__(self):
        self.count = 0
        self._task = asyncio.create_task(self._tick())

    async def _tick(self):
        while True:
            await asyncio.sleep(0.01)
            self.count += 1

    def stop(self) -> int:
        self._task.cancel()
        return self.count
