"""Requests that wait for a job's round to change, woken by this replica's own commits.

An agent that has done its part of a round phase asks for the round again with the state and
attempt it saw, and the aggregator answers as soon as either differs (or after ``wait_s``).
Every committed change of a job (``JobCoordinator.publish_events``) wakes this replica's waiters
for that job at once; a change another replica committed is seen by the periodic re-check, so
a wait never needs Redis and never lasts longer than the re-check after a change.
"""

from __future__ import annotations

import asyncio
import threading


class RoundWaiters:
    """asyncio events per job, set from the threads that commit changes."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[str, set[asyncio.Event]] = {}
        self._lock = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the waiting requests run on (set when the app starts)."""
        self._loop = loop

    def changed(self, job_id: str) -> None:
        """Wake every request waiting on ``job_id`` (safe from any thread)."""
        with self._lock:
            events = list(self._waiting.get(job_id, ()))
        if events and self._loop is not None:
            for event in events:
                self._loop.call_soon_threadsafe(event.set)

    async def wait(self, job_id: str, timeout_s: float) -> bool:
        """Return when ``job_id`` changes here (True), or after ``timeout_s`` (False)."""
        event = asyncio.Event()
        with self._lock:
            self._waiting.setdefault(job_id, set()).add(event)
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            return False
        else:
            return True
        finally:
            with self._lock:
                waiting = self._waiting.get(job_id, set())
                waiting.discard(event)
                if not waiting:
                    self._waiting.pop(job_id, None)
