"""Coordination between aggregator replicas: leases with fencing tokens, live events, idempotency.

Postgres stays the source of truth: every change to a round happens under the job's row lock,
so correctness never depends on Redis. Redis makes the cluster efficient and observable: one
replica at a time sweeps deadlines (a lease that expires if its holder dies), round events are
streamed to operators, and idempotency keys catch a retried upload before it reaches the
database (keys are recorded only after the upload they name is committed, so a refused upload
never burns its key). Without Redis (embedded mode) ``LocalCoordination`` gives the same interface in one
process. If Redis is unreachable, callers fall back to the database (see each method).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from typing import Any, Protocol

import redis

Event = dict[str, Any]
MAX_BLOCK_S = 10.0

_RENEW_OR_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('GET', KEYS[2]))
elseif not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return redis.call('INCR', KEYS[2])
end
return nil
"""


class CoordinationUnavailable(Exception):
    """Redis could not be reached; callers fall back to the database alone."""


class Coordination(Protocol):
    """What replicas share besides the database."""

    def hold_lease(self, name: str, holder: str, ttl_s: float) -> int | None:
        """Acquire or renew lease ``name``; the fencing token if ``holder`` has it, else None."""
        ...

    def idempotency_fingerprint(self, key: str) -> str | None:
        """The body fingerprint an accepted upload recorded under ``key``, if any."""
        ...

    def remember_idempotency_key(self, key: str, fingerprint: str, ttl_s: float) -> None:
        """Record ``key`` -> ``fingerprint`` once the upload it names has been accepted."""
        ...

    def latest_event_id(self) -> str:
        """The id of the newest event (a cursor to read everything published after now)."""
        ...

    def publish(self, event: Event) -> str:
        """Append an event to the live stream; returns its id."""
        ...

    def read_events(self, after: str, timeout_s: float, limit: int = 100) -> list[tuple[str, Event]]:
        """Events after id ``after``, waiting up to ``timeout_s`` for one."""
        ...


class LocalCoordination:
    """Single-process coordination for the embedded mode."""

    def __init__(self, max_events: int = 10_000):
        self._lock = threading.Condition()
        self._leases: dict[str, tuple[str, float, int]] = {}
        self._fences: dict[str, int] = {}
        self._keys: dict[str, tuple[str, float]] = {}
        self._events: deque[tuple[int, Event]] = deque(maxlen=max_events)
        self._next_id = 1

    def hold_lease(self, name: str, holder: str, ttl_s: float) -> int | None:
        with self._lock:
            now = time.monotonic()
            current = self._leases.get(name)
            if current is not None and current[1] > now and current[0] != holder:
                return None
            if current is not None and current[0] == holder and current[1] > now:
                token = current[2]
            else:
                token = self._fences.get(name, 0) + 1
                self._fences[name] = token
            self._leases[name] = (holder, now + ttl_s, token)
            return token

    def idempotency_fingerprint(self, key: str) -> str | None:
        with self._lock:
            stored = self._keys.get(key)
            return stored[0] if stored is not None and stored[1] > time.monotonic() else None

    def remember_idempotency_key(self, key: str, fingerprint: str, ttl_s: float) -> None:
        with self._lock:
            now = time.monotonic()
            if len(self._keys) > 10_000:
                self._keys = {k: v for k, v in self._keys.items() if v[1] > now}
            self._keys[key] = (fingerprint, now + ttl_s)

    def latest_event_id(self) -> str:
        with self._lock:
            return f"{self._next_id - 1}-0"

    def publish(self, event: Event) -> str:
        with self._lock:
            event_id = self._next_id
            self._next_id += 1
            self._events.append((event_id, event))
            self._lock.notify_all()
            return f"{event_id}-0"

    def read_events(self, after: str, timeout_s: float, limit: int = 100) -> list[tuple[str, Event]]:
        with self._lock:
            start = int(after.split("-", maxsplit=1)[0])
            deadline = time.monotonic() + timeout_s
            while True:
                found = [(f"{i}-0", e) for i, e in self._events if i > start][:limit]
                remaining = deadline - time.monotonic()
                if found or remaining <= 0:
                    return found
                self._lock.wait(remaining)


class RedisCoordination:
    """Coordination through Redis: a lease key plus a fencing counter, a stream, SET NX keys."""

    def __init__(self, url: str, prefix: str, max_events: int = 100_000):
        self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=10)
        # A blocking XREAD waits up to MAX_BLOCK_S for an event; its socket must outwait it, or
        # every quiet wait would time out and look like an outage.
        self._reader = redis.Redis.from_url(
            url, socket_timeout=MAX_BLOCK_S + 5, socket_connect_timeout=2, health_check_interval=10
        )
        self._prefix = prefix
        self._stream = f"{prefix}:events"
        self._max_events = max_events
        self._lease_script = self._redis.register_script(_RENEW_OR_ACQUIRE)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise CoordinationUnavailable(str(exc)) from exc

    def hold_lease(self, name: str, holder: str, ttl_s: float) -> int | None:
        keys = [f"{self._prefix}:lease:{name}", f"{self._prefix}:fence:{name}"]
        token = self._call(self._lease_script, keys=keys, args=[holder, int(ttl_s * 1000)])
        return None if token is None else int(token)

    def idempotency_fingerprint(self, key: str) -> str | None:
        stored = self._call(self._redis.get, f"{self._prefix}:idempotency:{key}")
        return None if stored is None else bytes(stored).decode()

    def remember_idempotency_key(self, key: str, fingerprint: str, ttl_s: float) -> None:
        self._call(self._redis.set, f"{self._prefix}:idempotency:{key}", fingerprint, ex=max(1, int(ttl_s)))

    def latest_event_id(self) -> str:
        newest = self._call(self._redis.xrevrange, self._stream, count=1)
        return bytes(newest[0][0]).decode() if newest else "0-0"

    def publish(self, event: Event) -> str:
        event_id = self._call(
            self._redis.xadd, self._stream, {"event": json.dumps(event)}, maxlen=self._max_events, approximate=True
        )
        return bytes(event_id).decode()

    def read_events(self, after: str, timeout_s: float, limit: int = 100) -> list[tuple[str, Event]]:
        block_ms = max(1, int(min(timeout_s, MAX_BLOCK_S) * 1000))
        response = self._call(self._reader.xread, {self._stream: after}, count=limit, block=block_ms)
        events: list[tuple[str, Event]] = []
        for _stream, entries in response or []:
            for event_id, fields in entries:
                events.append((bytes(event_id).decode(), json.loads(fields[b"event"])))
        return events


def coordination_for(redis_url: str | None, prefix: str) -> Coordination:
    """Redis coordination (its keys under ``prefix``) when a URL is configured, in-process otherwise."""
    return RedisCoordination(redis_url, prefix) if redis_url else LocalCoordination()
