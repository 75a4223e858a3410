"""``fedhe job watch JOB``: follow a job live in the terminal until it ends.

Readable at 80 columns: a header line (the job, its status, a bar of published rounds, how long
it has run), then one line per round attempt (its state, how many sites uploaded and declined,
the global accuracy the sites measured, the largest ε a site reported, bytes received, seconds)
and, below, one note per failed attempt or decline saying why. The bytes and seconds are the
figures the aggregator serves with each round (``bytes_uploaded``, ``duration_s``), shown as
served. It polls the aggregator (operators' view, so per-site details are there) and redraws in
place; with ``--json`` it prints one JSON line per round that changed, with every site's details.

``fedhe.cli.operator`` dispatches ``job watch`` here with its aggregator client; this module
imports nothing from it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from datetime import datetime

from rich.console import Console, Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fedhe.api_client import AggregatorClient
from fedhe.cli.output import cell
from fedhe.db import utcnow
from fedhe.schemas import JobPublic, JobStatus, RoundPublic, RoundState

BAR_WIDTH = 20


def round_accuracy(round_: RoundPublic) -> float | None:
    """The sample-weighted accuracy of a round's published model, once min_eval_sites sites evaluated it."""
    return None if round_.global_metrics is None else round_.global_metrics.get("accuracy")


def largest_epsilon(round_: RoundPublic) -> float | None:
    """The largest ε a site reported with its upload to this round (the one closest to its budget)."""
    spent = [s.metrics["epsilon"] for s in round_.submissions if isinstance(s.metrics.get("epsilon"), int | float)]
    return max(spent, default=None)


def answered(round_: RoundPublic) -> str:
    """How many sites uploaded to this attempt, and how many declined."""
    declined = f", {len(round_.declines)} declined" if round_.declines else ""
    return f"{round_.num_submissions} up{declined}"


def size(num_bytes: int) -> str:
    """A byte count as people read it (decimal units)."""
    if num_bytes < 1000:
        return f"{num_bytes} B"
    power = min(3, int(math.log10(num_bytes)) // 3)
    return f"{num_bytes / 1000**power:.1f} {('kB', 'MB', 'GB')[power - 1]}"


def round_label(round_: RoundPublic) -> str:
    """``3``, ``0 stats`` for the statistics round, ``3 try 2`` for a retried attempt."""
    kind = " stats" if round_.kind == "statistics" else ""
    attempt = f" try {round_.attempt}" if round_.attempt > 1 else ""
    return f"{round_.number}{kind}{attempt}"


def notes(rounds: list[RoundPublic], names: dict[str, str]) -> list[str]:
    """Why each failed attempt failed and why each declining site declined, one note each."""
    lines = []
    for r in rounds:
        if r.failure_reason:
            lines.append(f"round {round_label(r)} failed: {r.failure_reason}")
        for d in r.declines:
            message = f": {d.message}" if d.message else ""
            lines.append(
                f"round {round_label(r)}: {names.get(d.site_id, d.site_id)} declined ({d.reason.value}){message}"
            )
    return lines


def elapsed(job: JobPublic, now: datetime) -> str:
    """How long the job has run (until it ended), as H:MM:SS."""
    seconds = int(((job.finished_at or now) - job.created_at).total_seconds())
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def render(
    job: JobPublic, rounds: list[RoundPublic], names: dict[str, str], now: datetime | None = None
) -> RenderableType:
    """The job's header line, one line per round attempt, and the notes on failures and declines."""
    published = sum(1 for r in rounds if r.state == RoundState.PUBLISHED)
    header = Table.grid(padding=(0, 1), expand=True)
    # A long job name is cut, not the status or the counts after it.
    header.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
    for _ in range(4):
        header.add_column(no_wrap=True)
    header.add_row(
        Text(job.name, style="bold"),
        job.status.value,
        ProgressBar(total=job.total_rounds, completed=published, width=BAR_WIDTH),
        f"{published}/{job.total_rounds} rounds",
        elapsed(job, now or utcnow()),
    )
    labels = [round_label(r) for r in rounds]
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    # One line per attempt, whatever the terminal: a cell too long for it is cut, never wrapped,
    # and which round it is and its state are never cut.
    table.add_column("round", no_wrap=True, min_width=max(map(len, labels), default=0))
    table.add_column("state", no_wrap=True, min_width=max(len(state.value) for state in RoundState))
    for heading in ("sites", "accuracy", "max ε", "bytes up", "seconds"):
        table.add_column(heading, no_wrap=True, overflow="ellipsis")
    for label, r in zip(labels, rounds, strict=True):
        table.add_row(
            label,
            r.state.value,
            answered(r),
            cell(round_accuracy(r)),
            cell(largest_epsilon(r)),
            size(r.bytes_uploaded),
            cell(r.duration_s),
        )
    return Group(header, table, *(Text(note) for note in notes(rounds, names)))


def follow(
    client: AggregatorClient,
    job_id: str,
    show: Callable[[JobPublic, list[RoundPublic], dict[str, str]], None],
    interval_s: float = 1.0,
) -> JobPublic:
    """Poll a job and hand every new view to ``show`` until the job is no longer running."""
    names = {site.id: site.name for site in client.sites()}
    while True:
        job = client.job(job_id)
        show(job, client.rounds(job_id), names)
        if job.status != JobStatus.RUNNING:
            return job
        time.sleep(interval_s)


def watch(client: AggregatorClient, args: argparse.Namespace) -> int:
    """Follow ``args.job_id`` with ``client`` until it ends; exit 0 if it completed, 1 if it failed or was stopped."""
    console = Console()
    seen: dict[tuple[int, int], str] = {}

    def show_json(job: JobPublic, rounds: list[RoundPublic], names: dict[str, str]) -> None:
        for r in rounds:
            key = (r.number, r.attempt)
            if seen.get(key) != r.state.value:
                seen[key] = r.state.value
                print(json.dumps(r.model_dump(mode="json")), flush=True)

    if args.json:
        final = follow(client, args.job_id, show_json, args.interval)
    else:
        from rich.live import Live

        with Live(console=console, refresh_per_second=4) as live:
            final = follow(client, args.job_id, lambda j, r, n: live.update(render(j, r, n)), args.interval)
    console.print(f"job {final.id} ended {final.status.value}")
    return 0 if final.status == JobStatus.COMPLETED else 1
