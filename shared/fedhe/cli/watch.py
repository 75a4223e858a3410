"""``fedhe job watch JOB``: follow a job live in the terminal until it ends.

A progress bar of published rounds and one row per round attempt: state, sites that uploaded
or declined (and why), the global accuracy the sites measured, ε per site, bytes received and
how long the round took. It polls the aggregator (operators' view, so per-site details are
there) and redraws in place; with ``--json`` it prints one JSON line per round that changed.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from rich.console import Console, Group, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedhe.api_client import AggregatorClient
from fedhe.cli.operator import aggregator, round_accuracy, round_seconds
from fedhe.cli.output import cell
from fedhe.schemas import JobPublic, JobStatus, RoundPublic, RoundState


def site_epsilons(round_: RoundPublic, names: dict[str, str]) -> str:
    """ε each uploading site reported for this round, by site name."""
    parts = [
        f"{names.get(s.site_id, s.site_id)} {s.metrics['epsilon']:.2f}"
        for s in round_.submissions
        if isinstance(s.metrics.get("epsilon"), int | float)
    ]
    return ", ".join(parts) or "-"


def answered(round_: RoundPublic, names: dict[str, str]) -> str:
    """Sites that uploaded, and sites that declined with their reason."""
    uploaded = [names.get(s.site_id, s.site_id) for s in round_.submissions]
    declined = [f"{names.get(d.site_id, d.site_id)} declined ({d.reason.value})" for d in round_.declines]
    return ", ".join(uploaded + declined) or "-"


def render(job: JobPublic, rounds: list[RoundPublic], names: dict[str, str]) -> RenderableType:
    """The job's progress bar and its table of rounds."""
    progress = Progress(
        TextColumn(f"[bold]{job.name}[/] ({job.id}) {job.status.value}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rounds published"),
        TimeElapsedColumn(),
    )
    published = sum(1 for r in rounds if r.state == RoundState.PUBLISHED)
    progress.add_task("rounds", total=job.total_rounds, completed=published)
    table = Table(title_justify="left", expand=True)
    for header in ("round", "state", "sites", "global acc", "ε per site", "bytes up", "seconds"):
        table.add_column(header)
    for r in rounds:
        table.add_row(
            f"{r.number}"
            + (" statistics" if r.kind == "statistics" else "")
            + (f" (attempt {r.attempt})" if r.attempt > 1 else ""),
            r.state.value + (f": {r.failure_reason}" if r.failure_reason else ""),
            answered(r, names),
            cell(round_accuracy(r)),
            site_epsilons(r, names),
            cell(sum(s.num_bytes for s in r.submissions)),
            cell(round_seconds(r)),
        )
    return Group(progress, table)


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


def watch(args: argparse.Namespace) -> int:
    """Follow ``args.job_id`` until it ends; exit 0 if it completed, 1 if it failed or was stopped."""
    console = Console()
    seen: dict[tuple[int, int], str] = {}

    def show_json(job: JobPublic, rounds: list[RoundPublic], names: dict[str, str]) -> None:
        for r in rounds:
            key = (r.number, r.attempt)
            if seen.get(key) != r.state.value:
                seen[key] = r.state.value
                print(json.dumps(r.model_dump(mode="json")), flush=True)

    with aggregator(args) as client:
        if args.json:
            final = follow(client, args.job_id, show_json, args.interval)
        else:
            from rich.live import Live

            with Live(console=console, refresh_per_second=4) as live:
                final = follow(client, args.job_id, lambda j, r, n: live.update(render(j, r, n)), args.interval)
    console.print(f"job {final.id} ended {final.status.value}")
    return 0 if final.status == JobStatus.COMPLETED else 1
