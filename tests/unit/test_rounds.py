"""A round's lifecycle: legal transitions and every close rule, without HTTP or a database."""

from __future__ import annotations

import pytest

from aggregator.rounds import RoundCounts, RoundRules, Transition, accepts_uploads, transition
from fedhe.errors import Conflict
from fedhe.schemas import RoundState

S = RoundState
LEGAL = [
    (S.OPEN, S.COLLECTING),
    (S.OPEN, S.CLOSED),
    (S.OPEN, S.FAILED),
    (S.COLLECTING, S.UNMASKING),
    (S.COLLECTING, S.CLOSED),
    (S.COLLECTING, S.FAILED),
    (S.UNMASKING, S.CLOSED),
    (S.UNMASKING, S.FAILED),
    (S.CLOSED, S.PUBLISHED),
    (S.PUBLISHED, S.FAILED),
]
PLAIN = RoundRules(min_sites=2, target_sites=3, secure=False)
SECURE = RoundRules(min_sites=3, target_sites=4, secure=True)


@pytest.mark.parametrize(("current", "target"), LEGAL)
def test_legal_transitions(current: RoundState, target: RoundState) -> None:
    assert transition(current, target) is target


@pytest.mark.parametrize(("current", "target"), [(c, t) for c in S for t in S if (c, t) not in LEGAL])
def test_every_other_transition_is_refused(current: RoundState, target: RoundState) -> None:
    with pytest.raises(Conflict) as raised:
        transition(current, target)
    assert raised.value.code == "illegal_transition"


def test_uploads_go_to_open_or_collecting_plain_rounds_and_only_to_collecting_secure_ones() -> None:
    assert [s for s in S if accepts_uploads(s, secure=False)] == [S.OPEN, S.COLLECTING]
    assert [s for s in S if accepts_uploads(s, secure=True)] == [S.COLLECTING]


def test_a_plain_round_collects_after_its_first_upload_and_closes_at_its_target_not_before() -> None:
    assert PLAIN.next(S.OPEN, RoundCounts(expected=5), deadline_passed=False) is None
    assert PLAIN.next(S.OPEN, RoundCounts(expected=5, uploaded=1), deadline_passed=False) == Transition(S.COLLECTING)
    assert PLAIN.next(S.COLLECTING, RoundCounts(expected=5, uploaded=2), deadline_passed=False) is None
    assert PLAIN.next(S.COLLECTING, RoundCounts(expected=5, uploaded=3), deadline_passed=False) == Transition(S.CLOSED)


def test_a_plain_round_at_its_deadline_closes_with_min_sites_and_fails_below() -> None:
    assert PLAIN.next(S.COLLECTING, RoundCounts(expected=5, uploaded=2), deadline_passed=True) == Transition(S.CLOSED)
    failed = PLAIN.next(S.COLLECTING, RoundCounts(expected=5, uploaded=1, declined=1), deadline_passed=True)
    assert failed is not None
    assert failed.target == S.FAILED
    assert failed.reason == "1 uploaded and 1 declined by the deadline, fewer than min_sites=2"


def test_a_plain_round_closes_once_everyone_answered_whatever_the_count() -> None:
    assert PLAIN.next(
        S.COLLECTING, RoundCounts(expected=3, uploaded=2, declined=1), deadline_passed=False
    ) == Transition(S.CLOSED)
    done = PLAIN.next(S.OPEN, RoundCounts(expected=2, uploaded=1, declined=1), deadline_passed=False)
    assert done is not None
    assert done.target == S.FAILED


def test_the_statistics_step_waits_for_everyone_past_its_target() -> None:
    statistics = RoundRules(min_sites=2, target_sites=2, secure=False, waits_for_everyone=True)
    assert statistics.next(S.COLLECTING, RoundCounts(expected=3, uploaded=2), deadline_passed=False) is None
    assert statistics.next(S.COLLECTING, RoundCounts(expected=3, uploaded=3), deadline_passed=False) == Transition(
        S.CLOSED
    )
    secure = RoundRules(min_sites=3, target_sites=3, secure=True, waits_for_everyone=True)
    assert secure.next(S.OPEN, RoundCounts(expected=4, advertised=3), deadline_passed=False) is None
    assert secure.next(S.OPEN, RoundCounts(expected=4, advertised=4), deadline_passed=False) == Transition(S.COLLECTING)


def test_a_secure_round_fixes_its_roster_at_its_target_when_all_answered_or_at_its_deadline() -> None:
    assert SECURE.next(S.OPEN, RoundCounts(expected=6, advertised=3), deadline_passed=False) is None
    assert SECURE.next(S.OPEN, RoundCounts(expected=6, advertised=4), deadline_passed=False) == Transition(S.COLLECTING)
    assert SECURE.next(S.OPEN, RoundCounts(expected=4, advertised=3, declined=1), deadline_passed=False) == Transition(
        S.COLLECTING
    )
    assert SECURE.next(S.OPEN, RoundCounts(expected=6, advertised=3), deadline_passed=True) == Transition(S.COLLECTING)
    failed = SECURE.next(S.OPEN, RoundCounts(expected=6, advertised=2), deadline_passed=True)
    assert failed == Transition(S.FAILED, "2 advertised a key and 0 declined by the deadline, fewer than min_sites=3")
    everyone = SECURE.next(S.OPEN, RoundCounts(expected=4, advertised=2, declined=2), deadline_passed=False)
    assert everyone == Transition(S.FAILED, "2 advertised a key and 2 declined of 4 asked, fewer than min_sites=3")


def test_a_secure_round_unmasks_once_every_roster_member_uploaded_and_fails_if_one_is_missing() -> None:
    waiting = RoundCounts(expected=4, advertised=4, roster=4, uploaded=3)
    assert SECURE.next(S.COLLECTING, waiting, deadline_passed=False) is None
    assert SECURE.next(
        S.COLLECTING, RoundCounts(expected=4, roster=4, uploaded=4), deadline_passed=False
    ) == Transition(S.UNMASKING)
    late = SECURE.next(S.COLLECTING, waiting, deadline_passed=True)
    assert late is not None
    assert late.target == S.FAILED
    assert late.reason is not None
    assert late.reason.startswith("roster_incomplete: 3 of the roster's 4 members uploaded")
    declined = SECURE.next(
        S.COLLECTING, RoundCounts(expected=4, roster=4, uploaded=1, roster_declined=1), deadline_passed=False
    )
    assert declined == Transition(S.FAILED, "roster_incomplete: 1 member(s) declined")


def test_a_secure_round_closes_once_every_seed_can_be_rebuilt_and_fails_at_its_phase_deadline() -> None:
    counts = RoundCounts(expected=4, roster=4, uploaded=4)
    assert SECURE.next(S.UNMASKING, counts, deadline_passed=False) is None
    unmasked = RoundCounts(expected=4, roster=4, uploaded=4, unmasked=True)
    assert SECURE.next(S.UNMASKING, unmasked, deadline_passed=False) == Transition(S.CLOSED)
    late = SECURE.next(S.UNMASKING, counts, deadline_passed=True)
    assert late is not None
    assert late.target == S.FAILED
    assert late.reason is not None
    assert late.reason.startswith("unmasking_incomplete")


@pytest.mark.parametrize("state", [S.CLOSED, S.PUBLISHED, S.FAILED])
@pytest.mark.parametrize("rules", [PLAIN, SECURE])
def test_a_round_that_waits_for_no_site_never_moves_by_the_rules(state: RoundState, rules: RoundRules) -> None:
    everything = RoundCounts(expected=4, advertised=4, uploaded=4, roster=4, unmasked=True)
    assert rules.next(state, everything, deadline_passed=True) is None
