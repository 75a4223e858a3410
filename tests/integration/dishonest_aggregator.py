"""A dishonest coordinator for tests: the real aggregator process, with one lie patched in.

``python -m tests.integration.dishonest_aggregator ATTACK --port N`` serves the aggregator with
its usual ``FEDHE_AGGREGATOR_*`` settings after patching in ``ATTACK``:

- ``single_upload``: publishes one site's upload as the round's sum, its transcript cut to that
  site's statement and ``total_samples`` set to its n_k;
- ``subset``: publishes the sum of all uploads but one, with the honest transcript;
- ``inflated_total``: publishes the honest sum with ``total_samples`` doubled;
- ``replay``: serves each round's predecessor's sum and transcript as its own, the header rewritten;
- ``false_dropout``: claims, once, that a member of a full roster did not upload, fails the
  attempt and opens another (the sites then re-send their updates under fresh masks);
- ``reopen``: rebuilds every self-mask seed from the answers, then claims the unmasking failed
  and opens new attempts of the round.

Everything else is the real aggregator: TLS, Postgres, authentication, the same code.
"""

from __future__ import annotations

import argparse
import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

from aggregator import jobs
from aggregator.jobs import JobCoordinator
from aggregator.publisher import RoundPublisher
from aggregator.repository import AggregatorRepository
from aggregator.rounds import RoundCounts, RoundRules, Transition
from aggregator.settings import AggregatorSettings
from aggregator.tables import RoundRow
from fedhe.he.envelope import PREFIX_BYTES, encode_header, header_length, parse_header
from fedhe.logs import configure_logging
from fedhe.schemas import RoundState
from fedhe.secagg.messages import Transcript
from fedhe.serving import serve

ATTACKS = ("single_upload", "subset", "inflated_total", "replay", "false_dropout", "reopen")


def _rewrite_header(prefix: bytes, **changes: Any) -> bytes:
    """An aggregate envelope's header with some plaintext facts changed."""
    raw = prefix[PREFIX_BYTES : PREFIX_BYTES + header_length(prefix[:PREFIX_BYTES])]
    header = parse_header(raw, 2**40)
    meta = header.meta | changes
    return encode_header(
        format_id=header.format_id,
        key_id=header.key_id,
        num_values=header.num_values,
        chunk_sizes=header.chunk_sizes,
        meta=meta,
    )


def _patch_aggregate(rewrite: Any) -> None:
    """Serve ``rewrite(coordinator, honest_aggregate, job_id, number)`` for every aggregate request."""
    honest_aggregate = JobCoordinator.aggregate

    def aggregate(self: JobCoordinator, job_id: str, number: int) -> Iterator[bytes]:
        return iter(rewrite(self, honest_aggregate, job_id, number))

    JobCoordinator.aggregate = aggregate  # type: ignore[method-assign]


def _patch_transcript(rewrite: Any) -> None:
    honest_transcript = JobCoordinator.transcript

    def transcript(self: JobCoordinator, job_id: str, number: int, **kwargs: Any) -> Transcript:
        return rewrite(self, honest_transcript, job_id, number, kwargs)  # type: ignore[no-any-return]

    JobCoordinator.transcript = transcript  # type: ignore[method-assign]


def _sum_subset(keep: Any) -> None:
    honest_plan = RoundPublisher.plan

    def plan(self: RoundPublisher, job_id: str, round_id: int, require_state: RoundState = RoundState.CLOSED) -> Any:
        found = honest_plan(self, job_id, round_id, require_state)
        return None if found is None else dataclasses.replace(found, upload_ids=keep(found.upload_ids))

    RoundPublisher.plan = plan  # type: ignore[method-assign]


def _first_submission(coordinator: JobCoordinator, job_id: str, number: int) -> int:
    with coordinator.sessions.transaction() as session:
        repo = AggregatorRepository(session)
        row = repo.current_round(job_id, number)
        assert row is not None
        return repo.submissions(row.id)[0].num_samples


def _published(coordinator: JobCoordinator, job_id: str, number: int) -> bool:
    with coordinator.sessions.transaction() as session:
        row = AggregatorRepository(session).current_round(job_id, number)
        return row is not None and row.state == RoundState.PUBLISHED.value


def _single_upload() -> None:
    _sum_subset(lambda uploads: uploads[:1])

    def cut(self: JobCoordinator, honest: Any, job_id: str, number: int, kwargs: dict[str, Any]) -> Transcript:
        full: Transcript = honest(self, job_id, number, **kwargs)
        if not _published(self, job_id, number):
            return full  # the unmasking sees the honest roster: the lie is about what was published
        return full.model_copy(update={"statements": full.statements[:1]})

    def one(self: JobCoordinator, honest: Any, job_id: str, number: int) -> list[bytes]:
        prefix, *chunks = honest(self, job_id, number)
        total = _first_submission(self, job_id, number)
        return [_rewrite_header(prefix, total_samples=total, num_inputs=1), *chunks]

    _patch_transcript(cut)
    _patch_aggregate(one)


def _inflated_total() -> None:
    def doubled(self: JobCoordinator, honest: Any, job_id: str, number: int) -> list[bytes]:
        prefix, *chunks = honest(self, job_id, number)
        total = parse_header(prefix[PREFIX_BYTES:], 2**40).meta["total_samples"]
        return [_rewrite_header(prefix, total_samples=2 * total), *chunks]

    _patch_aggregate(doubled)


def _replay() -> None:
    """Once round n ≥ 1 is published, serve round n − 1's sum and transcript for it."""

    def previous_sum(self: JobCoordinator, honest: Any, job_id: str, number: int) -> list[bytes]:
        if number == 0:
            return list(honest(self, job_id, number))
        prefix, *chunks = honest(self, job_id, number - 1)
        return [_rewrite_header(prefix, round=number), *chunks]

    def previous(self: JobCoordinator, honest: Any, job_id: str, number: int, kwargs: dict[str, Any]) -> Transcript:
        if number == 0 or not _published(self, job_id, number):
            return honest(self, job_id, number, **kwargs)  # type: ignore[no-any-return]
        return honest(self, job_id, number - 1, caller_site=kwargs["caller_site"])  # type: ignore[no-any-return]

    _patch_aggregate(previous_sum)
    _patch_transcript(previous)


def _false_dropout() -> None:
    honest_next = RoundRules.next
    lied = threading.Event()

    def next_(self: RoundRules, state: RoundState, counts: RoundCounts, *, deadline_passed: bool) -> Transition | None:
        step = honest_next(self, state, counts, deadline_passed=deadline_passed)
        if step is not None and step.target == RoundState.UNMASKING and not lied.is_set():
            lied.set()
            return Transition(RoundState.FAILED, "roster_incomplete: a member did not upload (a lie)")
        return step

    RoundRules.next = next_  # type: ignore[method-assign]


def _reopen() -> None:
    honest_rebuild = jobs.rebuild_seeds

    def rebuild(repo: Any, spec: Any, row: RoundRow) -> str | None:
        return honest_rebuild(repo, spec, row) or "a member's shares did not add up (a lie: every seed was rebuilt)"

    jobs.rebuild_seeds = rebuild  # type: ignore[assignment]


def patch(attack: str) -> None:
    """Patch ``attack`` into this process's aggregator code."""
    if attack == "single_upload":
        _single_upload()
    elif attack == "subset":
        _sum_subset(lambda uploads: uploads[:-1])
    elif attack == "inflated_total":
        _inflated_total()
    elif attack == "replay":
        _replay()
    elif attack == "false_dropout":
        _false_dropout()
    elif attack == "reopen":
        _reopen()
    else:
        raise SystemExit(f"unknown attack {attack!r}; one of {', '.join(ATTACKS)}")


def main() -> None:
    """Serve the aggregator with the attack named on the command line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("attack", choices=ATTACKS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    patch(args.attack)
    settings = AggregatorSettings(host=args.host, port=args.port)
    configure_logging(settings.log_level, "aggregator")
    from aggregator.app import create_app

    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
