"""Rate limits per credential, client address and action: fixed windows in Redis or in memory.

Every replica of a service shares one budget when Redis is configured; without Redis (one
process, embedded mode) the counters live in memory. If Redis stops answering, a replica falls
back to its own memory counters rather than lifting the limits or refusing every request.

Keys are hashed before they are stored, so no credential or address reaches Redis in clear.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import redis

from fedhe.errors import TooManyRequests

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limit:
    """At most ``requests`` per window of ``window_s`` seconds."""

    requests: int
    window_s: int


class Counters(Protocol):
    """Where the window counters live."""

    def add(self, key: str, window_s: int) -> tuple[int, int]:
        """Count one event under ``key``; the count in the current window and seconds until it ends."""
        ...


class MemoryCounters:
    """Window counters of one process."""

    def __init__(self, max_keys: int = 100_000):
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[int, float]] = {}
        self._max_keys = max_keys

    def _current(self, key: str, now: float) -> tuple[int, float] | None:
        entry = self._windows.get(key)
        return entry if entry is not None and entry[1] > now else None

    def add(self, key: str, window_s: int) -> tuple[int, int]:
        with self._lock:
            now = time.monotonic()
            if len(self._windows) >= self._max_keys:
                self._windows = {k: v for k, v in self._windows.items() if v[1] > now}
            count, ends = self._current(key, now) or (0, now + window_s)
            self._windows[key] = (count + 1, ends)
            return count + 1, max(1, int(ends - now + 0.999))


class RedisCounters:
    """Window counters shared by every replica through Redis (INCR with an expiry)."""

    def __init__(self, url: str, prefix: str):
        self._redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._prefix = prefix

    def add(self, key: str, window_s: int) -> tuple[int, int]:
        name = f"{self._prefix}:{key}"
        pipe = self._redis.pipeline()
        pipe.incr(name)
        pipe.expire(name, window_s, nx=True)
        pipe.ttl(name)
        count, _, ttl = pipe.execute()
        return int(count), max(1, int(ttl))


class RateLimiter:
    """Named limits over hashed keys (a credential, a client address, a site id)."""

    def __init__(self, limits: dict[str, Limit], counters: Counters | None = None):
        self._limits = limits
        self._counters = counters or MemoryCounters()
        self._fallback = MemoryCounters()

    @staticmethod
    def _key(name: str, subject: str) -> str:
        return name + ":" + hashlib.sha256(subject.encode()).hexdigest()[:32]

    def _add(self, key: str, window_s: int) -> tuple[int, int]:
        try:
            return self._counters.add(key, window_s)
        except redis.RedisError as exc:
            logger.warning("rate-limit counters unavailable (%s); counting in this process", type(exc).__name__)
            return self._fallback.add(key, window_s)

    def spend(self, name: str, subject: str) -> tuple[int, int]:
        """Count one ``name`` event for ``subject``: how many are left in the window (negative once
        over the limit) and the seconds until the window ends."""
        limit = self._limits[name]
        count, retry_after = self._add(self._key(name, subject), limit.window_s)
        return limit.requests - count, retry_after

    def hit(self, name: str, subject: str) -> None:
        """Count one ``name`` event for ``subject``; ``TooManyRequests`` once over the limit."""
        left, retry_after = self.spend(name, subject)
        if left < 0:
            raise too_many(name, retry_after)


def too_many(name: str, retry_after_s: int) -> TooManyRequests:
    """The refusal of a request over the ``name`` budget."""
    return TooManyRequests(
        f"too many requests ({name}); retry in {retry_after_s} s", retry_after_s=retry_after_s, code="rate_limited"
    )


def counters_for(redis_url: str | None, prefix: str) -> Counters:
    """Redis counters when a URL is configured, memory counters otherwise."""
    return RedisCounters(redis_url, prefix) if redis_url else MemoryCounters()
