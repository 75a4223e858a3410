"""The privacy budget is a hard cap on everything a site releases: the ledger moves only when something is.

Real agents over TLS: a site that cannot get and check its key trains nothing; a site whose cap
a statistics step would pass sends no statistics. (A failing round's retry re-sends the update
it already made: ``test_dishonest_coordinator::test_a_false_dropout_claim_costs_an_attempt_not_a_second_training_run``
and ``test_federation``'s ledger test.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from client_agent.datasets import load_bundled, save_csv, split
from fedhe.job_options import StatisticsSettings
from fedhe.privacy import DPSettings
from fedhe.schemas import DeclineReason, FederationCreate
from fedhe_demo.local_cluster import (
    UNLIMITED_RATES,
    ManagedProcess,
    ProvisionedSite,
    free_port,
    start_agent,
    start_keyserver,
    url,
)
from tests.conftest import Cluster, PostgresDatabases
from tests.factories import job_create, model_spec
from tests.integration.helpers import log_messages


def _job(cluster: Cluster, tmp_path: Path, *, delta: float = 1e-5) -> tuple[str, list[ProvisionedSite], Path]:
    """A secure job with a statistics step on three members; one site's data on disk."""
    pool, _ = split(load_bundled("breast_cancer"), 0.5, seed=2)
    data = tmp_path / "data.csv"
    save_csv(pool, data)
    with cluster.keyserver_admin() as keyserver:
        federation = keyserver.create_federation(FederationCreate(name=tmp_path.name[:60]))
    request = job_create(
        federation.key_id,
        name="budget",
        model=model_spec(30),
        rounds=1,
        min_sites=3,
        round_deadline_s=3600,
        batch_size=16,
        dp=DPSettings(delta=delta),
        max_samples_per_round=1000,
        statistics=StatisticsSettings(feature_bounds=(np.abs(pool.x).max(axis=0) * 1.5).tolist()),
    )
    with cluster.aggregator_admin() as operator:
        job_id = operator.create_job(request).id
    sites = [cluster.provision_site(tmp_path, f"b{index}", federation.id) for index in range(3)]
    return job_id, sites, data


def _agent(
    cluster: Cluster,
    site: ProvisionedSite,
    name: str,
    job_id: str,
    data: Path,
    tmp_path: Path,
    *,
    keyserver_url: str | None = None,
    env: dict[str, str] | None = None,
) -> ManagedProcess:
    return start_agent(
        site=site,
        name=name,
        aggregator_url=cluster.aggregator_url,
        keyserver_url=keyserver_url or cluster.keyserver_url,
        secrets=cluster.secrets,
        data_path=data,
        state_dir=tmp_path / "state",
        job_id=job_id,
        log_dir=tmp_path / "logs",
        extra_env=env,
    )


def _spent_nothing(state_dir: Path, log: str) -> None:
    assert not (state_dir / "privacy-ledger.json").exists(), "budget spent"
    assert "trained on" not in log
    assert "noised statistics" not in log


def _nothing_reached(cluster: Cluster, job_id: str, site: ProvisionedSite) -> None:
    with cluster.aggregator_admin() as operator:
        round_ = operator.round(job_id, 0)
    assert round_.num_advertised == 0
    assert site.site_id not in {s.site_id for s in round_.submissions}


def test_an_agent_that_cannot_reach_the_keyserver_trains_nothing_and_spends_nothing(
    cluster: Cluster, tmp_path: Path
) -> None:
    job_id, sites, data = _job(cluster, tmp_path)
    closed = url(free_port())  # nothing listens there
    agent = _agent(cluster, sites[0], "no-keyserver", job_id, data, tmp_path, keyserver_url=closed)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "retrying" not in agent.log_path.read_text(encoding="utf-8"):
            time.sleep(0.5)
        time.sleep(5)  # several retries: none of them may train
        assert agent.process.poll() is None, agent.tail()
    finally:
        agent.stop()
    log = log_messages(agent.log_path)
    assert f"POST {closed}/v1/contexts/" in log
    _spent_nothing(tmp_path / "state", log)
    _nothing_reached(cluster, job_id, sites[0])


def test_an_agent_pointed_at_another_keyserver_stops_before_training(
    cluster: Cluster, postgres: PostgresDatabases, tmp_path: Path
) -> None:
    job_id, sites, data = _job(cluster, tmp_path)
    port = free_port()  # a keyserver of the same CA, with its own database: it never heard of this key or site
    other = start_keyserver(
        port=port,
        database_url=postgres.create("fedhe_other_keyserver"),
        secrets=cluster.secrets,
        log_dir=tmp_path / "logs",
        extra_env=UNLIMITED_RATES,
    )
    other_url = url(port)
    try:
        agent = _agent(cluster, sites[0], "wrong-keyserver", job_id, data, tmp_path, keyserver_url=other_url)
        assert agent.process.wait(timeout=180) == 11, agent.tail()  # refused
    finally:
        other.stop()
    log = log_messages(agent.log_path)
    assert "not_a_member" in log
    _spent_nothing(tmp_path / "state", log)
    _nothing_reached(cluster, job_id, sites[0])


def test_a_site_over_its_cap_declines_the_statistics_step_and_sends_nothing(cluster: Cluster, tmp_path: Path) -> None:
    """The statistics step costs ε 0.93 at σ = 4 (PLD, δ = 1e-5): a cap of 0.5 refuses it."""
    job_id, sites, data = _job(cluster, tmp_path)
    (tmp_path / "policy.json").write_text(json.dumps({"max_epsilon": 0.5}), encoding="utf-8")
    policy = {"FEDHE_AGENT_POLICY_FILE": str(tmp_path / "policy.json")}
    agent = _agent(cluster, sites[0], "capped", job_id, data, tmp_path, env=policy)
    assert agent.process.wait(timeout=180) == 10, agent.tail()  # budget exhausted
    log = log_messages(agent.log_path)
    assert "round 0 would bring ε to 0.93, over the site's limit 0.5" in log
    _spent_nothing(tmp_path / "state", log)
    _nothing_reached(cluster, job_id, sites[0])
    with cluster.aggregator_admin() as operator:
        declines = operator.round(job_id, 0).declines
    assert [(d.site_id, d.reason) for d in declines] == [(sites[0].site_id, DeclineReason.BUDGET_EXHAUSTED)]


def test_a_site_whose_rows_make_delta_too_large_refuses_before_anything(cluster: Cluster, tmp_path: Path) -> None:
    """The job declared no site sizes, so only the site can check δ < 1/n for its 227 training rows."""
    job_id, sites, data = _job(cluster, tmp_path, delta=0.01)
    agent = _agent(cluster, sites[0], "small", job_id, data, tmp_path)
    assert agent.process.wait(timeout=180) == 11, agent.tail()  # refused
    log = log_messages(agent.log_path)
    assert "δ=0.01 is not below 1/n = 0.00441 for this site's 227 training rows" in log
    _spent_nothing(tmp_path / "state", log)
    _nothing_reached(cluster, job_id, sites[0])
    with cluster.aggregator_admin() as operator:
        declines = operator.round(job_id, 0).declines
    assert [(d.site_id, d.reason) for d in declines] == [(sites[0].site_id, DeclineReason.REFUSED)]
    assert "δ=0.01 is not below 1/n = 0.00441" in declines[0].message
