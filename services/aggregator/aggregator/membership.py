"""Which sites belong to which federation: the keyserver decides, the aggregator follows.

A site sees, uploads to and is evaluated in only the jobs of federations whose keyserver
membership lists it as active with the same public key the aggregator registered for it. The
aggregator caches the keyserver's answer briefly; it never adds a member itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol

from fedhe.schemas import FederationPublic, MemberPublic, MemberStatus


class MembershipSource(Protocol):
    """Where memberships come from (the keyserver, with the aggregator's service identity)."""

    def members(self, federation_id: str) -> list[MemberPublic]:
        """A federation's members."""
        ...

    def federation(self, federation_id: str) -> FederationPublic:
        """A federation's name and keys."""
        ...

    def federations(self) -> list[FederationPublic]:
        """Every federation."""
        ...


class FederationMembers:
    """Active members and their pinned keys per federation, cached for ``ttl_s`` seconds."""

    def __init__(self, source: MembershipSource, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self._source = source
        self._ttl_s = ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[float, dict[str, str]]] = {}
        # One keyserver call per federation in flight; concurrent lookups wait for its result.
        self._fetches: dict[str, Future[dict[str, str]]] = {}
        self._names: dict[str, str] = {}
        self._listed: tuple[float, list[str]] | None = None
        self._lock = threading.Lock()

    def _active(self, federation_id: str) -> dict[str, str]:
        now = self._clock()
        with self._lock:
            cached = self._cache.get(federation_id)
            if cached is not None and now - cached[0] < self._ttl_s:
                return cached[1]
            fetch = self._fetches.get(federation_id)
            leads = fetch is None
            if fetch is None:
                fetch = self._fetches[federation_id] = Future()
        if not leads:
            # Hundreds of uploads can find the cache expired at once; they share one keyserver call.
            return fetch.result()
        try:
            active = {
                m.site_id: m.public_key for m in self._source.members(federation_id) if m.status == MemberStatus.ACTIVE
            }
        except BaseException as exc:
            with self._lock:
                del self._fetches[federation_id]
            # The waiters get the same error: a keyserver that is down is not asked once per waiter in turn.
            fetch.set_exception(exc)
            raise
        with self._lock:
            self._cache[federation_id] = (now, active)
            del self._fetches[federation_id]
        fetch.set_result(active)
        return active

    def active(self, federation_id: str) -> dict[str, str]:
        """Active members of ``federation_id`` and their pinned public keys."""
        return dict(self._active(federation_id))

    def name(self, federation_id: str) -> str:
        """A federation's name (names do not change, so it is fetched once)."""
        with self._lock:
            known = self._names.get(federation_id)
        if known is None:
            known = self._source.federation(federation_id).name
            with self._lock:
                self._names[federation_id] = known
        return known

    def federation_ids(self) -> list[str]:
        """Every federation at the keyserver, so operators see one (and its members) before it has a job."""
        now = self._clock()
        with self._lock:
            listed = self._listed
        if listed is not None and now - listed[0] < self._ttl_s:
            return list(listed[1])
        federations = self._source.federations()
        with self._lock:
            self._names.update((f.id, f.name) for f in federations)
            self._listed = (now, sorted(f.id for f in federations))
        return sorted(f.id for f in federations)

    def is_member(self, federation_id: str, site_id: str, public_key: str) -> bool:
        """Whether the keyserver lists ``site_id`` as an active member with ``public_key``."""
        return self._active(federation_id).get(site_id) == public_key
