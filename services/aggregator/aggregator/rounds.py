"""The round state machine and the rules that move a round through it.

::

    open ──first upload──▶ collecting ──target reached──▶ closed ──▶ published
      │                        │                             (sum and Σ n_k stored)
      └──── deadline ──────────┴──▶ closed (≥ min_sites) ──▶ published
                                └─▶ failed (< min_sites)

After ``published`` the job opens the next round (or completes); after ``failed`` it opens a
new attempt of the same round or fails the job, as its ``on_round_failure`` policy says.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedhe.errors import Conflict
from fedhe.schemas import RoundState

_ALLOWED: dict[RoundState, frozenset[RoundState]] = {
    RoundState.OPEN: frozenset({RoundState.COLLECTING, RoundState.CLOSED, RoundState.FAILED}),
    RoundState.COLLECTING: frozenset({RoundState.CLOSED, RoundState.FAILED}),
    RoundState.CLOSED: frozenset({RoundState.PUBLISHED}),
    RoundState.PUBLISHED: frozenset(),
    RoundState.FAILED: frozenset(),
}


@dataclass(frozen=True)
class RoundStateMachine:
    """Legal transitions and closing rules for a job's rounds."""

    min_sites: int
    target_sites: int

    @staticmethod
    def transition(current: RoundState, target: RoundState) -> RoundState:
        """``target`` if the move is legal, else ``Conflict``."""
        if target not in _ALLOWED[current]:
            raise Conflict(f"a round cannot go from {current.value} to {target.value}", code="illegal_transition")
        return target

    @staticmethod
    def accepts_uploads(state: RoundState) -> bool:
        """Whether a round in ``state`` takes uploads."""
        return state in (RoundState.OPEN, RoundState.COLLECTING)

    def after_upload(self, num_submissions: int) -> RoundState:
        """The state after an accepted upload brought the count to ``num_submissions``."""
        return RoundState.CLOSED if num_submissions >= self.target_sites else RoundState.COLLECTING

    def at_deadline(self, num_submissions: int) -> RoundState:
        """The state of a round whose deadline passed with ``num_submissions`` uploads."""
        return RoundState.CLOSED if num_submissions >= self.min_sites else RoundState.FAILED
