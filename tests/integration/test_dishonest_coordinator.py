"""A dishonest coordinator against real agents over TLS: no member applies anything but an honest aggregate.

Each test starts the real aggregator with one lie patched in (``dishonest_aggregator``) and three
real agents (DP-SGD, TenSEAL) on breast-cancer splits. What a lie may cost is a round or the job;
what it must never cost is a site applying a sum that is not its roster's honest sum, or training
twice for one round.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client_agent.datasets import load_bundled, partition_dirichlet, save_csv, split
from fedhe.schemas import DeclineReason, FederationCreate, JobStatus, RoundPublic, RoundState
from fedhe_demo.local_cluster import (
    UNLIMITED_RATES,
    ClusterSecrets,
    ManagedProcess,
    ProvisionedSite,
    free_port,
    provision_site,
    start_agent,
    start_aggregator,
    url,
)
from tests.conftest import PostgresDatabases, start_test_keyserver
from tests.factories import job_create, model_spec
from tests.integration.helpers import log_messages


@dataclass
class Keyserver:
    secrets: ClusterSecrets
    url: str
    workdir: Path


@pytest.fixture(scope="module")
def keyserver(postgres: PostgresDatabases, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyserver]:
    workdir = tmp_path_factory.mktemp("dishonest")
    secrets, process, keyserver_url = start_test_keyserver(postgres, workdir, "fedhe_dishonest_keyserver")
    try:
        yield Keyserver(secrets, keyserver_url, workdir)
    finally:
        process.stop()


@dataclass
class Attacked:
    """What three agents did under one attack."""

    job_id: str
    exit_codes: list[int]
    sites: list[ProvisionedSite]
    site_dirs: list[Path]
    rounds: list[RoundPublic]
    status: JobStatus
    logs: list[str]

    def applied(self, index: int) -> int:
        """How many rounds site ``index`` applied to its global model."""
        chain = self.site_dirs[index] / "state" / f"{self.job_id}-global.npz"
        if not chain.exists():
            return 0
        with np.load(chain) as saved:
            return int(json.loads(saved["meta"].tobytes())["next_round"])

    def ledger(self, index: int) -> list[dict[str, Any]]:
        path = self.site_dirs[index] / "state" / "privacy-ledger.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else []


def _attack(postgres: PostgresDatabases, keyserver: Keyserver, attack: str, **job: Any) -> Attacked:
    workdir = keyserver.workdir / attack
    port = free_port()
    aggregator = start_aggregator(
        port=port,
        database_url=postgres.create(f"fedhe_dishonest_{attack}"),
        keyserver_url=keyserver.url,
        secrets=keyserver.secrets,
        log_dir=workdir / "logs",
        name=f"dishonest-{attack}",
        extra_env={**UNLIMITED_RATES, "FEDHE_AGGREGATOR_DEADLINE_CHECK_INTERVAL_S": "0.5"},
        command=("tests.integration.dishonest_aggregator", attack),
    )
    agents: list[ManagedProcess] = []
    try:
        with keyserver.secrets.keyserver_admin(keyserver.url) as admin:
            federation = admin.create_federation(FederationCreate(name=attack))
        request = job_create(
            federation.key_id,
            name=attack,
            model=model_spec(30),
            rounds=2,
            min_sites=3,
            batch_size=16,
            max_samples_per_round=400,
            secure_aggregation={"threshold": 2, "phase_deadline_s": 20},
            **job,
        )
        with keyserver.secrets.aggregator_admin(url(port)) as operator:
            job_id = operator.create_job(request).id
        pool, _ = split(load_bundled("breast_cancer"), 0.2, seed=7)
        parts = partition_dirichlet(pool.y, 3, alpha=5.0, seed=7, min_size=64)
        sites, site_dirs = [], []
        for index, rows in enumerate(parts):
            site = provision_site(
                aggregator_url=url(port),
                keyserver_url=keyserver.url,
                secrets=keyserver.secrets,
                directory=workdir,
                name=f"site{index}",
                federation_id=federation.id,
            )
            data = workdir / f"site{index}" / "data.csv"
            save_csv(pool.subset(rows), data)
            sites.append(site)
            site_dirs.append(data.parent)
            agents.append(
                start_agent(
                    site=site,
                    name=f"agent{index}",
                    aggregator_url=url(port),
                    keyserver_url=keyserver.url,
                    secrets=keyserver.secrets,
                    data_path=data,
                    state_dir=data.parent / "state",
                    job_id=job_id,
                    log_dir=workdir / "logs",
                )
            )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and any(agent.process.poll() is None for agent in agents):
            time.sleep(0.5)
        codes = [agent.process.poll() for agent in agents]
        assert None not in codes, [agent.tail() for agent in agents]
        with keyserver.secrets.aggregator_admin(url(port)) as operator:
            rounds, status = operator.rounds(job_id), operator.job(job_id).status
        logs = [log_messages(agent.log_path) for agent in agents]
        return Attacked(job_id, [int(c) for c in codes if c is not None], sites, site_dirs, rounds, status, logs)
    finally:
        for agent in agents:
            agent.stop()
        aggregator.stop()


def _refusals(attacked: Attacked, number: int) -> set[tuple[str, DeclineReason]]:
    published = [r for r in attacked.rounds if r.number == number and r.published_at is not None]
    assert len(published) == 1
    return {(d.site_id, d.reason) for d in published[0].declines}


@pytest.mark.parametrize(
    ("attack", "reason", "says"),
    [
        ("single_upload", DeclineReason.AGGREGATE_REFUSED, "it sums 1 signed uploads, fewer than 3"),
        ("inflated_total", DeclineReason.AGGREGATE_REFUSED, "its total_samples is not the sum of the signed n_k"),
        ("subset", DeclineReason.IMPLAUSIBLE_AGGREGATE, "beyond what 3 inputs within ±R can add up to"),
    ],
)
def test_a_sum_that_is_not_the_rosters_honest_sum_is_refused_by_every_member(
    postgres: PostgresDatabases, keyserver: Keyserver, attack: str, reason: DeclineReason, says: str
) -> None:
    attacked = _attack(postgres, keyserver, attack)
    assert [attacked.applied(i) for i in range(3)] == [0, 0, 0]
    refusing = [site for site, code in zip(attacked.sites, attacked.exit_codes, strict=True) if code == 16]
    assert _refusals(attacked, 0) == {(site.site_id, reason) for site in refusing}
    assert all(says in log for log, code in zip(attacked.logs, attacked.exit_codes, strict=True) if code == 16)
    if reason == DeclineReason.AGGREGATE_REFUSED:
        assert attacked.exit_codes == [16, 16, 16]  # aggregate_refused, each on its own
    else:
        # The first refusal fails the round and the job; a site that sees the job failed
        # before it decrypted ends with it (13), having applied nothing either.
        assert refusing
        assert set(attacked.exit_codes) <= {13, 16}
        assert attacked.status == JobStatus.FAILED
        assert attacked.rounds[0].failure_reason is not None
        assert attacked.rounds[0].failure_reason.startswith("implausible_aggregate")


def test_a_replayed_aggregate_is_refused_and_the_honest_one_before_it_was_applied(
    postgres: PostgresDatabases, keyserver: Keyserver
) -> None:
    attacked = _attack(postgres, keyserver, "replay")
    assert attacked.exit_codes == [16, 16, 16]
    assert [attacked.applied(i) for i in range(3)] == [1, 1, 1]  # round 0 honest, round 1 replayed
    assert _refusals(attacked, 1) == {(site.site_id, DeclineReason.AGGREGATE_REFUSED) for site in attacked.sites}
    assert all("it is for another round attempt" in log for log in attacked.logs)


def test_a_false_dropout_claim_costs_an_attempt_not_a_second_training_run(
    postgres: PostgresDatabases, keyserver: Keyserver
) -> None:
    attacked = _attack(postgres, keyserver, "false_dropout")
    assert attacked.exit_codes == [0, 0, 0]
    first, second = attacked.rounds[0], attacked.rounds[1]
    assert (first.number, first.attempt, first.state) == (0, 1, RoundState.FAILED)
    assert first.failure_reason == "roster_incomplete: a member did not upload (a lie)"
    assert (second.number, second.attempt, second.state, second.num_submissions) == (0, 2, RoundState.PUBLISHED, 3)
    for index in range(3):
        assert [(entry["round"], entry["released"]) for entry in attacked.ledger(index)] == [(0, True), (1, True)]
    finals = [np.load(d / "state" / f"{attacked.job_id}-final-weights.npy") for d in attacked.site_dirs]
    assert all(final.tobytes() == finals[0].tobytes() for final in finals)


def test_a_round_reopened_after_unmasking_gets_no_second_upload_from_any_member(
    postgres: PostgresDatabases, keyserver: Keyserver
) -> None:
    attacked = _attack(postgres, keyserver, "reopen", max_round_attempts=2)
    assert attacked.status == JobStatus.FAILED
    first, second = attacked.rounds[0], attacked.rounds[1]
    assert first.failure_reason is not None
    assert first.failure_reason.startswith("unmasking_failed: a member's shares did not add up (a lie")
    assert (second.attempt, second.num_submissions, second.num_advertised) == (2, 0, 0)
    assert {(d.site_id, d.reason) for d in second.declines} == {
        (site.site_id, DeclineReason.ALREADY_UNMASKED) for site in attacked.sites
    }
    assert [attacked.applied(i) for i in range(3)] == [0, 0, 0]
    for index in range(3):
        assert [entry["round"] for entry in attacked.ledger(index)] == [0]  # trained once, never again
