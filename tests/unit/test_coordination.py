"""In-process coordination (embedded mode): leases, idempotency keys and the event cursor."""

from __future__ import annotations

from aggregator.coordination import LocalCoordination


def test_lease_is_exclusive_renewable_and_fenced() -> None:
    coordination = LocalCoordination()
    first = coordination.hold_lease("sweeper", "a", ttl_s=60)
    assert first is not None
    assert coordination.hold_lease("sweeper", "b", ttl_s=60) is None
    assert coordination.hold_lease("sweeper", "a", ttl_s=60) == first
    assert coordination.hold_lease("other", "b", ttl_s=60) is not None


def test_expired_lease_passes_to_another_holder_with_a_higher_fence() -> None:
    coordination = LocalCoordination()
    first = coordination.hold_lease("sweeper", "a", ttl_s=0)
    second = coordination.hold_lease("sweeper", "b", ttl_s=60)
    assert first is not None
    assert second is not None
    assert second > first


def test_idempotency_key_is_known_only_once_remembered() -> None:
    coordination = LocalCoordination()
    assert coordination.idempotency_fingerprint("k") is None
    coordination.remember_idempotency_key("k", "sha-1", ttl_s=60)
    assert coordination.idempotency_fingerprint("k") == "sha-1"


def test_events_published_after_the_cursor_are_not_lost_between_reads() -> None:
    coordination = LocalCoordination()
    coordination.publish({"kind": "before"})
    cursor = coordination.latest_event_id()
    assert coordination.read_events(cursor, timeout_s=0) == []
    coordination.publish({"kind": "between-reads"})
    events = coordination.read_events(cursor, timeout_s=0)
    assert [event["kind"] for _, event in events] == ["between-reads"]
    assert coordination.read_events(events[-1][0], timeout_s=0) == []
