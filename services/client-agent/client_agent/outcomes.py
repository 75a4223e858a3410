"""How a site's part in a job ended, and the exit code ``fedhe agent --once`` returns for it.

| code | status | meaning |
|---|---|---|
| 0 | completed | the job completed; this site took part to the end and exported the model |
| 10 | budget_exhausted | the next round would pass the site's privacy budget; the site declined it |
| 11 | refused | a service refused this site (not a member, revoked, or an update it could not accept) |
| 12 | data_problem | the site's data cannot be used for this job (file, rows, labels, too many rows) |
| 13 | failed / stopped | the job itself failed or an operator stopped it |
| 14 | environment_mismatch | this site's versions differ from the job's (Python, TensorFlow, TenSEAL, …) |
| 15 | stale_key | the job's key was retired at the keyserver |
| 16 | aggregate_refused | a published aggregate did not prove an honest sum, or honest inputs cannot make it |
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from fedhe.schemas import DeclineReason


class OutcomeStatus(enum.StrEnum):
    """How the site's part in a job ended."""

    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"
    BUDGET_EXHAUSTED = "budget_exhausted"
    REFUSED = "refused"
    DATA_PROBLEM = "data_problem"
    ENVIRONMENT_MISMATCH = "environment_mismatch"
    STALE_KEY = "stale_key"
    AGGREGATE_REFUSED = "aggregate_refused"


EXIT_CODES: dict[OutcomeStatus, int] = {
    OutcomeStatus.COMPLETED: 0,
    OutcomeStatus.BUDGET_EXHAUSTED: 10,
    OutcomeStatus.REFUSED: 11,
    OutcomeStatus.DATA_PROBLEM: 12,
    OutcomeStatus.FAILED: 13,
    OutcomeStatus.STOPPED: 13,
    OutcomeStatus.ENVIRONMENT_MISMATCH: 14,
    OutcomeStatus.STALE_KEY: 15,
    OutcomeStatus.AGGREGATE_REFUSED: 16,
}

DECLINE_REASONS: dict[OutcomeStatus, DeclineReason] = {
    OutcomeStatus.BUDGET_EXHAUSTED: DeclineReason.BUDGET_EXHAUSTED,
    OutcomeStatus.REFUSED: DeclineReason.REFUSED,
    OutcomeStatus.DATA_PROBLEM: DeclineReason.DATA_PROBLEM,
    OutcomeStatus.ENVIRONMENT_MISMATCH: DeclineReason.ENVIRONMENT_MISMATCH,
    OutcomeStatus.STALE_KEY: DeclineReason.STALE_KEY,
}


@dataclass
class JobOutcome:
    """How the agent's part in a job ended."""

    job_id: str
    status: OutcomeStatus
    rounds_trained: int = 0
    epsilon: float = 0.0
    exported_model: Path | None = None
    notes: list[str] = field(default_factory=list)


def exit_code(outcomes: list[JobOutcome]) -> int:
    """The exit code of a run: 0 when every job completed, else the code of the first that did not."""
    for outcome in outcomes:
        if outcome.status != OutcomeStatus.COMPLETED:
            return EXIT_CODES[outcome.status]
    return 0
