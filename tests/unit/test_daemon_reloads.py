"""daemon.Coalesced, the SIGHUP reload queue: a burst of requests during a reload is one more
reload, never reloads side by side or a pile of tasks."""

from __future__ import annotations

import asyncio

from zddd.daemon import Coalesced


def test_a_burst_of_requests_during_a_run_is_one_more_run():
    async def scenario():
        running = 0
        overlap = []
        release = asyncio.Event()

        async def job():
            nonlocal running
            running += 1
            overlap.append(running)
            await release.wait()
            running -= 1

        queue = Coalesced(job)
        queue.request()
        await asyncio.sleep(0)  # the first run has started and waits
        tasks = len(asyncio.all_tasks())
        for _ in range(100):
            queue.request()
        assert len(asyncio.all_tasks()) == tasks  # no task per request
        release.set()
        for _ in range(100):
            await asyncio.sleep(0)
        assert queue.runs == 2 and overlap == [1, 1]
        queue.request()  # after the burst, a request runs again
        for _ in range(10):
            await asyncio.sleep(0)
        assert queue.runs == 3

    asyncio.run(asyncio.wait_for(scenario(), 10))
