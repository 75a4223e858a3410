"""Whether a site's data fits a job, every problem at once: what ``fedhe agent check-data`` prints
and what the agent checks before it takes part in a job (so a site with a broken file declines
before any round, spends no budget, and its admin fixes everything in one pass).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from client_agent.datasets import DataProblems, Dataset, split
from client_agent.settings import DataSettings
from fedhe.errors import DataProblem, InvalidRequest
from fedhe.schemas import JobCreate

logger = logging.getLogger("fedhe.agent")


def check_rows_fit(job: JobCreate, training_rows: int, delta: float) -> None:
    """Refuse training rows a job cannot use: more than its per-round cap, or so few that δ is not below 1/n."""
    if training_rows > job.max_samples_per_round:
        raise InvalidRequest(
            f"this site has {training_rows} training rows, more than the job's "
            f"max_samples_per_round={job.max_samples_per_round}; ask the operator to raise it",
            code="too_many_samples",
        )
    if delta >= 1 / training_rows:
        raise InvalidRequest(
            f"the job's δ={delta:g} is not below 1/n = {1 / training_rows:.3g} for this site's {training_rows} "
            "training rows: at that δ the DP guarantee allows rows to be released in the clear; ask the operator "
            "for a smaller dp.delta, or set max_delta in this site's policy",
            code="delta_too_large",
        )


@dataclass
class DataCheck:
    """What a site's data looks like to a job, or every reason it does not fit."""

    source: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    training_rows: int = 0
    validation_rows: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        """No problem was found."""
        return not self.problems


def load_for_job(
    settings: DataSettings, job: JobCreate, problems: DataProblems | None = None
) -> tuple[Dataset, Dataset]:
    """The site's (training, validation) rows as the job's model reads them; ``DataProblem`` listing
    every problem. Without ``problems`` to collect them, warnings go to the log."""
    collected = problems if problems is not None else DataProblems()
    data = settings.load(job.model.data_schema(), collected)
    if problems is None:
        for warning in collected.warnings:
            logger.warning("%s", warning)
    return split(data, settings.validation_fraction, seed=0)


def check_data(settings: DataSettings, job: JobCreate, delta: float) -> DataCheck:
    """Load the site's data as ``job`` would and report every problem and warning (nothing is raised)."""
    problems = DataProblems()
    report = DataCheck(source=settings.data_path)
    try:
        training, validation = load_for_job(settings, job, problems)
    except DataProblem as exc:
        report.problems = list(exc.detail.get("problems") or [exc.message])
        report.warnings = problems.warnings
        return report
    report.warnings = problems.warnings
    report.training_rows, report.validation_rows = len(training), len(validation)
    names = job.model.class_names or [str(i) for i in range(job.model.num_classes)]
    counts = Counter(int(label) for label in (*training.y, *validation.y))
    report.class_counts = {names[i]: counts.get(i, 0) for i in range(len(names))}
    absent = [name for name, count in report.class_counts.items() if count == 0]
    if absent:
        report.warnings.append(f"no rows of class {', '.join(absent)} (the site trains on the classes it has)")
    try:
        check_rows_fit(job, len(training), delta)
        if len(training) < job.batch_size:
            raise InvalidRequest(
                f"this site has {len(training)} training rows, fewer than one batch of {job.batch_size}"
            )
    except InvalidRequest as exc:
        report.problems.append(exc.message)
    return report
