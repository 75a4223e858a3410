"""The aggregator's cache of the keyserver's membership, under concurrent lookups."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from aggregator import membership
from aggregator.membership import FederationMembers
from fedhe.db import utcnow
from fedhe.schemas import FederationPublic, MemberPublic, MemberStatus

LOOKUPS = 50
FEDERATION = "fed-0000000000000001"


def _site(call: int) -> dict[str, str]:
    return {f"site-{call:016x}": f"key-{call}"}


class _Keyserver:
    """Counts member fetches; each fetch after the first waits for ``release`` and names its site by call number."""

    def __init__(self) -> None:
        self.fetches = 0
        self.release = threading.Event()
        self.fail = False
        self._count = threading.Lock()

    def members(self, federation_id: str) -> list[MemberPublic]:
        with self._count:
            self.fetches += 1
            call = self.fetches
        if call > 1:
            assert self.release.wait(timeout=10)
        if self.fail:
            raise ConnectionError("keyserver unreachable")
        return [
            MemberPublic(
                federation_id=federation_id,
                site_id=f"site-{call:016x}",
                name=f"site {call}",
                public_key=f"key-{call}",
                status=MemberStatus.ACTIVE,
                proposed_at=utcnow(),
            )
        ]

    def federation(self, federation_id: str) -> FederationPublic:
        raise NotImplementedError

    def federations(self) -> list[FederationPublic]:
        raise NotImplementedError


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _expired_cache(keyserver: _Keyserver) -> FederationMembers:
    clock = _Clock()
    members = FederationMembers(keyserver, ttl_s=10, clock=clock)
    assert members.active(FEDERATION) == _site(1)
    clock.now = 11
    return members


def _look_up_concurrently(
    members: FederationMembers, keyserver: _Keyserver, monkeypatch: pytest.MonkeyPatch
) -> list[Future[dict[str, str]]]:
    """LOOKUPS lookups at once; the fetch is held until every other lookup is waiting for it."""
    waiting = threading.Semaphore(0)

    class CountedFetch(Future[dict[str, str]]):
        """The running fetch; each lookup that waits for it is counted."""

        def result(self, timeout: float | None = None) -> dict[str, str]:
            waiting.release()
            return super().result(timeout)

    monkeypatch.setattr(membership, "Future", CountedFetch)
    start = threading.Barrier(LOOKUPS)

    def look_up() -> dict[str, str]:
        start.wait()
        return members.active(FEDERATION)

    with ThreadPoolExecutor(LOOKUPS) as pool:
        lookups = [pool.submit(look_up) for _ in range(LOOKUPS)]
        for _ in range(LOOKUPS - 1):
            assert waiting.acquire(timeout=30), "a lookup did not join the running fetch"
        keyserver.release.set()
    return lookups


def test_concurrent_lookups_on_an_expired_cache_share_one_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    keyserver = _Keyserver()
    members = _expired_cache(keyserver)

    lookups = _look_up_concurrently(members, keyserver, monkeypatch)

    assert keyserver.fetches == 2
    assert [lookup.result() for lookup in lookups] == [_site(2)] * LOOKUPS
    assert members.is_member(FEDERATION, f"site-{2:016x}", "key-2")
    assert keyserver.fetches == 2


def test_a_failed_fetch_fails_its_waiters_and_the_next_lookup_fetches_again(monkeypatch: pytest.MonkeyPatch) -> None:
    keyserver = _Keyserver()
    members = _expired_cache(keyserver)
    keyserver.fail = True

    lookups = _look_up_concurrently(members, keyserver, monkeypatch)

    assert keyserver.fetches == 2
    assert all(isinstance(lookup.exception(), ConnectionError) for lookup in lookups)
    keyserver.fail = False
    assert members.active(FEDERATION) == _site(3)


class _Listing:
    """A keyserver with two federations, counting how often it is asked for the list."""

    def __init__(self) -> None:
        self.listings = 0

    def members(self, federation_id: str) -> list[MemberPublic]:
        return []

    def federation(self, federation_id: str) -> FederationPublic:
        raise AssertionError("the names come with the list")

    def federations(self) -> list[FederationPublic]:
        self.listings += 1
        return [
            FederationPublic(
                id=f"fed-{n:016x}",
                name=f"network {n}",
                key_id=f"key-{n:032x}",
                created_at=utcnow(),
                endorsements_required=1,
                bootstrap_complete=True,
                contexts=[],
            )
            for n in (2, 1)
        ]


def test_the_federation_list_is_fetched_once_per_ttl_with_the_names() -> None:
    keyserver = _Listing()
    clock = _Clock()
    members = FederationMembers(keyserver, ttl_s=10, clock=clock)

    assert members.federation_ids() == [f"fed-{1:016x}", f"fed-{2:016x}"]
    assert members.name(f"fed-{2:016x}") == "network 2"
    clock.now = 9
    members.federation_ids()
    assert keyserver.listings == 1
    clock.now = 11
    members.federation_ids()
    assert keyserver.listings == 2
