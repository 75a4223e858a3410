"""A round's lifecycle: its phases, every rule that moves it, and the one path each trigger takes.

Rounds without secure aggregation::

    open ──first upload──▶ collecting ──target reached, or everyone answered──▶ closed ──sum──▶ published
      └──────────── deadline: closed (≥ min_sites) or failed (< min_sites) ──────┘

Secure rounds (ADR 0010), each phase with its own deadline::

    open ──roster fixed──▶ collecting ──every roster member uploaded──▶ unmasking ──seeds rebuilt──▶ closed
    (sites advertise keys)  (sites train, upload masked updates)          (shares)                    │ sum
      │ < min_sites advertised   │ a member missing or declining            │ too few answers          ▼
      ▼                          ▼                                          ▼                      published
    failed                     failed                                     failed

    published ──a member shows the sum is implausible──▶ failed (and the job fails)

After ``failed`` the job opens a new attempt of the same round, or fails, as its
``on_round_failure`` says; after ``published`` it opens the next round or completes.

Every trigger (an accepted upload, a decline, an advertisement, an unmasking answer, a passed
deadline) calls ``RoundLifecycle.advance`` inside the job's lock: ``RoundRules.next`` decides
from the round's counts alone, so the rules hold the same whichever trigger comes first. A
round left ``closed`` is then summed and published by the caller's after-close step
(``RoundPublisher.publish``), or by the watcher if the caller died first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from aggregator.tables import RoundRow
from fedhe.db import utcnow
from fedhe.errors import Conflict
from fedhe.schemas import JobCreate, JobStatus, RoundState

if TYPE_CHECKING:
    from aggregator.jobs import JobChange

_ALLOWED: dict[RoundState, frozenset[RoundState]] = {
    RoundState.OPEN: frozenset({RoundState.COLLECTING, RoundState.CLOSED, RoundState.FAILED}),
    RoundState.COLLECTING: frozenset({RoundState.UNMASKING, RoundState.CLOSED, RoundState.FAILED}),
    RoundState.UNMASKING: frozenset({RoundState.CLOSED, RoundState.FAILED}),
    RoundState.CLOSED: frozenset({RoundState.PUBLISHED}),
    RoundState.PUBLISHED: frozenset({RoundState.FAILED}),
    RoundState.FAILED: frozenset(),
}
ACTIVE = (RoundState.OPEN, RoundState.COLLECTING, RoundState.UNMASKING)
"""States in which a round waits for sites, under a deadline."""


def transition(current: RoundState, target: RoundState) -> RoundState:
    """``target`` if the move is legal, else ``Conflict``."""
    if target not in _ALLOWED[current]:
        raise Conflict(f"a round cannot go from {current.value} to {target.value}", code="illegal_transition")
    return target


def accepts_uploads(state: RoundState, *, secure: bool) -> bool:
    """Whether a round in ``state`` takes uploads (a secure round only once its roster is fixed)."""
    return state == RoundState.COLLECTING if secure else state in (RoundState.OPEN, RoundState.COLLECTING)


def round_duration_s(row: RoundRow) -> float | None:
    """Seconds from opening until the attempt ended: its publication, or its closing if it failed.

    None while the attempt runs (a closed round is not over until its sum is published). The
    ``round.published`` event and the served round (``RoundPublic.duration_s``) both carry this
    figure; the CLI, the demo and the dashboard show it as served.
    """
    if row.published_at is not None:
        end = row.published_at
    elif row.state == RoundState.FAILED.value and row.closed_at is not None:
        end = row.closed_at
    else:
        return None
    return (end - row.opened_at).total_seconds()


@dataclass(frozen=True)
class RoundCounts:
    """What the rules look at: how many sites the round asks for and what they have done."""

    expected: int
    advertised: int = 0
    uploaded: int = 0
    declined: int = 0
    roster: int = 0
    roster_declined: int = 0
    unmasked: bool = False


@dataclass(frozen=True)
class Transition:
    """Where a round goes next, and why (the reason is kept with a failed round)."""

    target: RoundState
    reason: str | None = None


@dataclass(frozen=True)
class RoundRules:
    """Every close rule of a job's rounds (pure: the lifecycle applies what ``next`` decides)."""

    min_sites: int
    target_sites: int
    secure: bool
    waits_for_everyone: bool = False

    @classmethod
    def of(cls, spec: JobCreate, number: int) -> RoundRules:
        """The rules of round ``number`` of a job (the statistics step waits for every member)."""
        return cls(
            min_sites=spec.min_sites,
            target_sites=spec.target_sites or spec.min_sites,
            secure=spec.secure_aggregation is not None,
            waits_for_everyone=spec.is_statistics_round(number),
        )

    def next(self, state: RoundState, counts: RoundCounts, *, deadline_passed: bool) -> Transition | None:
        """The transition the round makes now, if any."""
        if self.secure:
            return self._next_secure(state, counts, deadline_passed)
        return self._next_plain(state, counts, deadline_passed)

    def _enough(self, count: int, what: str, counts: RoundCounts, deadline_passed: bool) -> Transition:
        if count >= self.min_sites:
            return Transition(RoundState.COLLECTING if self.secure else RoundState.CLOSED)
        when = "by the deadline" if deadline_passed else f"of {counts.expected} asked"
        return Transition(
            RoundState.FAILED,
            f"{count} {what} and {counts.declined} declined {when}, fewer than min_sites={self.min_sites}",
        )

    def _next_plain(self, state: RoundState, counts: RoundCounts, deadline_passed: bool) -> Transition | None:
        if state not in (RoundState.OPEN, RoundState.COLLECTING):
            return None
        if not self.waits_for_everyone and counts.uploaded >= self.target_sites:
            return Transition(RoundState.CLOSED)
        if deadline_passed or (counts.expected > 0 and counts.uploaded + counts.declined >= counts.expected):
            return self._enough(counts.uploaded, "uploaded", counts, deadline_passed)
        if state == RoundState.OPEN and counts.uploaded > 0:
            return Transition(RoundState.COLLECTING)
        return None

    def _next_secure(self, state: RoundState, counts: RoundCounts, deadline_passed: bool) -> Transition | None:
        phase = {
            RoundState.OPEN: self._advertising,
            RoundState.COLLECTING: self._uploading,
            RoundState.UNMASKING: self._unmasking,
        }.get(state)
        return None if phase is None else phase(counts, deadline_passed)

    def _advertising(self, counts: RoundCounts, deadline_passed: bool) -> Transition | None:
        everyone = counts.expected > 0 and counts.advertised + counts.declined >= counts.expected
        target = not self.waits_for_everyone and counts.advertised >= self.target_sites
        if target or everyone or deadline_passed:
            return self._enough(counts.advertised, "advertised a key", counts, deadline_passed)
        return None

    @staticmethod
    def _uploading(counts: RoundCounts, deadline_passed: bool) -> Transition | None:
        if counts.roster_declined:
            return Transition(RoundState.FAILED, f"roster_incomplete: {counts.roster_declined} member(s) declined")
        if counts.uploaded >= counts.roster:
            return Transition(RoundState.UNMASKING)
        if deadline_passed:
            return Transition(
                RoundState.FAILED,
                f"roster_incomplete: {counts.uploaded} of the roster's {counts.roster} members uploaded by the "
                "phase deadline (the others' masks cannot cancel without them)",
            )
        return None

    @staticmethod
    def _unmasking(counts: RoundCounts, deadline_passed: bool) -> Transition | None:
        if counts.unmasked:
            return Transition(RoundState.CLOSED)
        if deadline_passed:
            return Transition(
                RoundState.FAILED, "unmasking_incomplete: too few members answered to rebuild every self mask"
            )
        return None


class RoundLifecycle:
    """Applies the rules to one job's rounds within its locked transaction (``JobChange``).

    ``counts`` reads a round's counts from storage, ``on_roster`` fixes a secure round's roster
    and ``on_unmasked`` rebuilds its self-mask seeds (``None``, or the reason they cannot be);
    ``select`` draws the sites a new training round asks for.
    """

    def __init__(
        self,
        counts: Callable[[JobChange, RoundRow, int], RoundCounts],
        on_roster: Callable[[JobChange, RoundRow], None],
        on_unmasked: Callable[[JobChange, RoundRow], str | None],
        select: Callable[[JobChange], list[str] | None],
    ):
        self._counts = counts
        self._on_roster = on_roster
        self._on_unmasked = on_unmasked
        self._select = select

    @staticmethod
    def spec(change: JobChange) -> JobCreate:
        """The locked job's spec."""
        return JobCreate.model_validate(change.job.spec)

    def open_round(self, change: JobChange, *, number: int, attempt: int) -> RoundRow:
        """Open attempt ``attempt`` of round ``number`` (a training round draws its sites first)."""
        spec = self.spec(change)
        now = utcnow()
        deadline = now + timedelta(seconds=spec.round_deadline_s)
        selected = None if spec.is_statistics_round(number) else self._select(change)
        row = RoundRow(
            job_id=change.job.id,
            number=number,
            attempt=attempt,
            state=RoundState.OPEN.value,
            opened_at=now,
            deadline_at=deadline,
            selected_sites=selected,
        )
        change.repo.add(row)
        change.job.current_round = number
        change.repo.flush()
        change.emit(
            "round.opened",
            round=number,
            attempt=attempt,
            deadline_at=deadline.isoformat(),
            round_kind="statistics" if spec.is_statistics_round(number) else "training",
            selected_sites=selected,
            secure=spec.secure_aggregation is not None,
        )
        return row

    def advance(
        self,
        change: JobChange,
        row: RoundRow,
        expected_sites: int,
        *,
        now: datetime | None = None,
        fence: int | None = None,
    ) -> bool:
        """Make every transition the rules allow now; returns whether the round is left closed (its sum is due).

        ``fence`` is the deadline lease's fencing token when the watcher advances a round; the
        audit log records it so an operator can tell which lease holder acted.
        """
        if change.job.status != JobStatus.RUNNING.value:
            return False
        spec = self.spec(change)
        rules = RoundRules.of(spec, row.number)
        moment = now or utcnow()
        expected = len(row.selected_sites) if row.selected_sites is not None else expected_sites
        while (
            step := rules.next(
                RoundState(row.state), self._counts(change, row, expected), deadline_passed=row.deadline_at <= moment
            )
        ) is not None:
            self._apply(change, row, step, spec, moment, fence)
            if RoundState(row.state) not in ACTIVE:
                break
        return row.state == RoundState.CLOSED.value

    def _apply(
        self, change: JobChange, row: RoundRow, step: Transition, spec: JobCreate, now: datetime, fence: int | None
    ) -> None:
        state = transition(RoundState(row.state), step.target)
        detail: dict[str, Any] = {"round": row.number, "attempt": row.attempt, "fence": fence}
        if state == RoundState.FAILED:
            self.fail(change, row, step.reason or "failed", detail)
            return
        phase_deadline = spec.secure_aggregation.phase_deadline_s if spec.secure_aggregation is not None else None
        if state == RoundState.COLLECTING and spec.secure_aggregation is not None:
            # The sites train in this phase (they advertised before training): it gets a round's deadline.
            self._on_roster(change, row)
            row.deadline_at = now + timedelta(seconds=spec.round_deadline_s)
            row.state = state.value
            detail |= {"roster": [m["site_id"] for m in row.roster or []]}
            change.repo.audit(actor="aggregator", action="round.roster", subject=change.job.id, detail=detail)
            change.emit("round.roster_fixed", deadline_at=row.deadline_at.isoformat(), **detail)
            return
        if state == RoundState.UNMASKING:
            assert phase_deadline is not None
            row.deadline_at = now + timedelta(seconds=phase_deadline)
            row.state = state.value
            change.emit("round.unmasking", deadline_at=row.deadline_at.isoformat(), **detail)
            return
        if state == RoundState.CLOSED and spec.secure_aggregation is not None:
            problem = self._on_unmasked(change, row)
            if problem is not None:
                self.fail(change, row, f"unmasking_failed: {problem}", detail)
                return
        row.state = state.value
        if state == RoundState.CLOSED:
            row.closed_at = now
            detail |= {"sites": row.num_submissions, "total_samples": row.total_samples}
            change.repo.audit(actor="aggregator", action="round.close", subject=change.job.id, detail=detail)
            change.emit("round.closed", **detail)

    def fail(
        self, change: JobChange, row: RoundRow, reason: str, detail: dict[str, Any] | None = None, *, retry: bool = True
    ) -> None:
        """Fail a round attempt (from any state that allows it), then retry it (unless ``retry`` is
        false) or fail the job, as the job says."""
        job, spec, now = change.job, self.spec(change), utcnow()
        row.state = transition(RoundState(row.state), RoundState.FAILED).value
        row.closed_at = row.closed_at or now
        row.failure_reason = reason
        detail = (detail or {"round": row.number, "attempt": row.attempt}) | {"reason": reason}
        change.repo.audit(actor="aggregator", action="round.fail", subject=job.id, detail=detail)
        change.emit("round.failed", **detail)
        if retry and spec.on_round_failure == "retry" and row.attempt < spec.max_round_attempts:
            self.open_round(change, number=row.number, attempt=row.attempt + 1)
        else:
            job.status = JobStatus.FAILED.value
            job.finished_at = now
            change.emit("job.failed", reason=f"round {row.number} failed {row.attempt} time(s): {reason}")

    @staticmethod
    def abandon(row: RoundRow, reason: str) -> None:
        """Fail a round that waits for sites because its job ends (stopped, or failed elsewhere): no retry."""
        row.state = transition(RoundState(row.state), RoundState.FAILED).value
        row.closed_at = utcnow()
        row.failure_reason = reason

    def publish(self, change: JobChange, row: RoundRow) -> None:
        """Publish a closed round whose sum is stored, and open the next round (or complete the job)."""
        job, spec, now = change.job, self.spec(change), utcnow()
        row.state = transition(RoundState(row.state), RoundState.PUBLISHED).value
        row.published_at = now
        detail = {
            "round": row.number,
            "attempt": row.attempt,
            "sites": row.num_submissions,
            "total_samples": row.total_samples,
        }
        change.repo.audit(actor="aggregator", action="round.publish", subject=job.id, detail=detail)
        change.emit("round.published", duration_s=round_duration_s(row), **detail)
        if job.status == JobStatus.RUNNING.value and row.number + 1 < spec.total_rounds:
            self.open_round(change, number=row.number + 1, attempt=1)
        elif job.status == JobStatus.RUNNING.value:
            job.status = JobStatus.COMPLETED.value
            job.finished_at = now
            change.emit("job.completed")
