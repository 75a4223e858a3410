"""The round state machine's transitions and closing rules."""

from __future__ import annotations

import pytest

from aggregator.rounds import RoundStateMachine
from fedhe.errors import Conflict
from fedhe.schemas import RoundState

LEGAL = [
    (RoundState.OPEN, RoundState.COLLECTING),
    (RoundState.OPEN, RoundState.CLOSED),
    (RoundState.OPEN, RoundState.FAILED),
    (RoundState.COLLECTING, RoundState.CLOSED),
    (RoundState.COLLECTING, RoundState.FAILED),
    (RoundState.CLOSED, RoundState.PUBLISHED),
]


@pytest.mark.parametrize(("current", "target"), LEGAL)
def test_legal_transitions(current: RoundState, target: RoundState) -> None:
    assert RoundStateMachine.transition(current, target) is target


@pytest.mark.parametrize(
    ("current", "target"),
    [(c, t) for c in RoundState for t in RoundState if (c, t) not in LEGAL],
)
def test_every_other_transition_is_refused(current: RoundState, target: RoundState) -> None:
    with pytest.raises(Conflict):
        RoundStateMachine.transition(current, target)


def test_uploads_only_while_open_or_collecting() -> None:
    assert [s for s in RoundState if RoundStateMachine.accepts_uploads(s)] == [RoundState.OPEN, RoundState.COLLECTING]


def test_closes_at_target_and_not_before() -> None:
    rules = RoundStateMachine(min_sites=2, target_sites=3)
    assert rules.after_upload(2) == RoundState.COLLECTING
    assert rules.after_upload(3) == RoundState.CLOSED


def test_deadline_publishes_with_min_sites_and_fails_below() -> None:
    rules = RoundStateMachine(min_sites=2, target_sites=3)
    assert rules.at_deadline(2) == RoundState.CLOSED
    assert rules.at_deadline(1) == RoundState.FAILED
    assert rules.at_deadline(0) == RoundState.FAILED
