"""Requests waiting on a job's round are woken by a change committed from another thread."""

from __future__ import annotations

import asyncio
import threading

from aggregator.round_waiters import RoundWaiters


def test_a_change_from_another_thread_wakes_only_that_jobs_waiters() -> None:
    async def scenario() -> tuple[bool, bool, bool]:
        waiters = RoundWaiters()
        waiters.bind(asyncio.get_running_loop())
        first = asyncio.create_task(waiters.wait("job-a", 30))
        second = asyncio.create_task(waiters.wait("job-a", 30))
        other = asyncio.create_task(waiters.wait("job-b", 0.2))
        await asyncio.sleep(0)  # let the waits register
        committer = threading.Thread(target=waiters.changed, args=("job-a",))
        committer.start()
        committer.join()
        return await first, await second, await other

    assert asyncio.run(scenario()) == (True, True, False)


def test_a_wait_without_a_change_times_out_and_leaves_nothing_behind() -> None:
    async def scenario() -> tuple[bool, int]:
        waiters = RoundWaiters()
        waiters.bind(asyncio.get_running_loop())
        woken = await waiters.wait("job-a", 0.01)
        waiters.changed("job-a")  # nobody waits: nothing to wake, nothing kept
        return woken, len(waiters._waiting)

    assert asyncio.run(scenario()) == (False, 0)
