"""``fedhe job watch`` at 80 columns: a header line, one line per round attempt, one note per
failure or decline, on a job as the aggregator reports it mid-run; bytes and seconds as served."""

from __future__ import annotations

import ast
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console

from fedhe.cli import watch as watch_module
from fedhe.cli.watch import render, size
from fedhe.schemas import DeclinePublic, JobPublic, RoundPublic, SubmissionPublic

STARTED = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
JOB_ID = "job-0123456789abcdef"
SITES = {
    "site-3d1c94bede834e16": "Hospital A",
    "site-9d1268216146816a": "Hospital B",
    "site-6a747a1edc1b8b5f": "Hospital C oncology",
}
A, B, C = SITES


def _upload(site_id: str, epsilon: float) -> SubmissionPublic:
    return SubmissionPublic(
        site_id=site_id,
        num_samples=47,
        num_bytes=1_398_112,
        sha256="ab" * 32,
        metrics={"epsilon": epsilon, "train_loss": 0.31, "local_val_accuracy": 0.9},
        received_at=STARTED,
    )


def _round(number: int, attempt: int = 1, **fields: Any) -> RoundPublic:
    """A round as the aggregator serves it, its figures (bytes, seconds) computed there."""
    submissions = fields.get("submissions", [])
    base: dict[str, Any] = {
        "job_id": JOB_ID,
        "number": number,
        "attempt": attempt,
        "state": "published",
        "opened_at": STARTED,
        "deadline_at": STARTED + timedelta(minutes=5),
        "num_submissions": len(submissions),
        "total_samples": 47 * len(submissions),
        "bytes_uploaded": sum(s.num_bytes for s in submissions),
    }
    return RoundPublic.model_validate(base | fields)


def _job() -> JobPublic:
    return JobPublic.model_validate(
        {
            "name": "wine-logistic-regression-with-dp",
            "key_id": "key-" + "ab" * 16,
            "model": {"architecture": "logistic", "input_dim": 13, "num_classes": 3},
            "rounds": 8,
            "format_id": "bfv-packed-v1",
            "id": JOB_ID,
            "federation_id": "fed-0123456789abcdef",
            "environment": {"python": "3", "tensorflow": "2", "tensorflow_privacy": "0", "tenseal": "0", "fedhe": "0"},
            "status": "running",
            "current_round": 4,
            "created_at": STARTED.isoformat(),
            "num_parameters": 42,
        }
    )


def _rounds() -> list[RoundPublic]:
    published = [
        _round(
            n,
            submissions=[_upload(site, 0.31 * n + i / 100) for i, site in enumerate(SITES)],
            published_at=STARTED + timedelta(seconds=6.1 * n),
            duration_s=6.1 * n,
            global_metrics={"accuracy": 0.9 + n / 100},
        )
        for n in (1, 2, 3)
    ]
    failed = _round(
        4,
        state="failed",
        submissions=[_upload(A, 1.3), _upload(B, 1.31)],
        closed_at=STARTED + timedelta(minutes=5),
        duration_s=300.0,
        failure_reason=f"roster_incomplete: Hospital C oncology ({C}) did not upload by the deadline",
        declines=[
            DeclinePublic(
                site_id=C, reason="data_problem", message="sites/c/wine.csv row 12 column 'alcohol': NaN", at=STARTED
            )
        ],
    )
    retried = _round(4, attempt=2, state="collecting", submissions=[_upload(A, 1.3)])
    return [*published, failed, retried]


def _lines(width: int) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=width).print(render(_job(), _rounds(), SITES, now=STARTED + timedelta(seconds=173)))
    return [line.rstrip() for line in out.getvalue().splitlines()]


def test_watch_shows_one_line_per_round_attempt_in_80_columns() -> None:
    lines = _lines(80)
    assert max(len(line) for line in lines) <= 80
    header, headings, *rows = lines
    assert header.split()[:2] == ["wine-logistic-regression-with-dp", "running"]
    assert header.endswith("3/8 rounds 0:02:53")
    assert headings.split() == ["round", "state", "sites", "accuracy", "max", "ε", "bytes", "up", "seconds"]
    assert [row.split() for row in rows[:5]] == [
        ["1", "published", "3", "up", "0.91", "0.33", "4.2", "MB", "6.1"],
        ["2", "published", "3", "up", "0.92", "0.64", "4.2", "MB", "12.2"],
        ["3", "published", "3", "up", "0.93", "0.95", "4.2", "MB", "18.3"],
        ["4", "failed", "2", "up,", "1", "declined", "-", "1.31", "2.8", "MB", "300"],
        ["4", "try", "2", "collecting", "1", "up", "-", "1.3", "1.4", "MB", "-"],
    ]
    assert " ".join(rows[5:]) == (
        f"round 4 failed: roster_incomplete: Hospital C oncology ({C}) did not upload by the deadline "
        "round 4: Hospital C oncology declined (data_problem): sites/c/wine.csv row 12 column 'alcohol': NaN"
    )


def test_a_round_stays_on_one_line_in_a_narrower_terminal() -> None:
    lines = _lines(60)
    assert max(len(line) for line in lines) <= 60
    assert lines[0].split()[:2] == ["wine-logist…", "running"]
    assert [line.split()[:2] for line in lines[2:7]] == [
        ["1", "published"],
        ["2", "published"],
        ["3", "published"],
        ["4", "failed"],
        ["4", "try"],
    ]


def test_bytes_and_seconds_are_the_figures_the_aggregator_serves() -> None:
    # A round whose uploads the caller does not see in detail still has its served figures.
    served = _round(0, state="published", num_submissions=3, bytes_uploaded=5_240_000, duration_s=42.5)
    assert served.submissions == []
    out = io.StringIO()
    Console(file=out, width=80).print(render(_job(), [served], SITES, now=STARTED))
    row = out.getvalue().splitlines()[2].split()
    assert row[-3:] == ["5.2", "MB", "42.5"]


def test_bytes_up_are_shown_in_decimal_units() -> None:
    assert [size(n) for n in (0, 999, 1000, 1_398_112, 2_796_224_000, 10**13)] == [
        "0 B",
        "999 B",
        "1.0 kB",
        "1.4 MB",
        "2.8 GB",
        "10000.0 GB",
    ]


def test_watch_and_operator_do_not_import_each_other_both_ways() -> None:
    """``fedhe.cli.operator`` dispatches ``job watch`` here; this module imports nothing from it."""
    imported = set()
    for node in ast.walk(ast.parse(Path(watch_module.__file__).read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert not any(name.startswith("fedhe.cli.operator") for name in imported)
