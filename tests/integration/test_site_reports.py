"""Sites tell the operator what they do: heartbeats, declines with reasons, early round closing, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from client_agent.agent import DATA_PROBLEM_NOTICE
from client_agent.datasets import load_bundled, save_csv, split
from fedhe.api_client import AggregatorClient
from fedhe.cli.operator import with_fingerprint
from fedhe.environment import current as current_environment
from fedhe.errors import Conflict
from fedhe.modelspec import ModelSpec
from fedhe.schemas import (
    AgentState,
    DeclineCreate,
    DeclineReason,
    FederationCreate,
    HeartbeatCreate,
    PrivacyReport,
    RoundState,
)
from fedhe_demo.local_cluster import ProvisionedSite
from tests.conftest import Cluster
from tests.factories import job_create, model_spec
from tests.integration.faults_support import MODEL, UploadingSite, uploading_federation


def _federation_job(cluster: Cluster, tmp_path: Path, sites: int, **job: object) -> tuple[str, list[UploadingSite]]:
    return uploading_federation(cluster.secrets, cluster.keyserver_url, cluster.aggregator_url, tmp_path, sites, **job)


def _as_site(cluster: Cluster, site: ProvisionedSite) -> AggregatorClient:
    return AggregatorClient(cluster.aggregator_url, site.credential, tls=cluster.secrets.tls)


def _upload(cluster: Cluster, site: UploadingSite, job_id: str, seed: int) -> None:
    weights = np.random.default_rng(seed).uniform(-1, 1, MODEL.num_parameters())
    response = site.post(cluster.aggregator_url, job_id, 0, site.body(weights, 10))
    assert response.status_code == 201, response.text


def test_heartbeats_show_state_versions_and_privacy(cluster: Cluster, tmp_path: Path) -> None:
    job_id, (site,) = _federation_job(cluster, tmp_path, 1, min_sites=1)
    report = HeartbeatCreate(
        state=AgentState.TRAINING,
        job_id=job_id,
        round=0,
        environment=current_environment(),
        privacy=PrivacyReport(epsilon=1.25, delta=1e-5, max_epsilon=3.0),
    )
    with _as_site(cluster, site.site) as as_site:
        as_site.heartbeat(report)
    with cluster.aggregator_admin() as operator:
        listed = operator.site(site.site.site_id)
    assert listed.agent is not None
    assert (listed.agent.state, listed.agent.online, listed.agent.job_id) == (AgentState.TRAINING, True, job_id)
    assert listed.agent.environment == current_environment()
    assert listed.agent.privacy == PrivacyReport(epsilon=1.25, delta=1e-5, max_epsilon=3.0)


def test_a_round_closes_as_soon_as_every_member_uploaded_or_declined(cluster: Cluster, tmp_path: Path) -> None:
    job_id, sites = _federation_job(cluster, tmp_path, 3, min_sites=2, target_sites=3, round_deadline_s=3600)
    _upload(cluster, sites[0], job_id, 1)
    with _as_site(cluster, sites[1].site) as as_site:
        as_site.decline_round(
            job_id, 0, DeclineCreate(reason=DeclineReason.BUDGET_EXHAUSTED, message="ε would reach 3.4")
        )
        with pytest.raises(Conflict) as twice:
            as_site.decline_round(job_id, 0, DeclineCreate(reason=DeclineReason.OTHER))
        assert twice.value.code == "duplicate_decline"
    refused = sites[1].post(cluster.aggregator_url, job_id, 0, sites[1].body(np.ones(MODEL.num_parameters()), 10))
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "round_declined"
    with cluster.aggregator_admin() as operator:
        assert operator.round(job_id, 0).state == RoundState.COLLECTING
    _upload(cluster, sites[2], job_id, 2)
    with cluster.aggregator_admin() as operator:
        published = operator.round(job_id, 0)
        events = operator.audit_events(200)
    assert published.state == RoundState.PUBLISHED, "the round waited for its deadline although everyone had answered"
    assert published.num_submissions == 2
    assert [(d.site_id, d.reason, d.message) for d in published.declines] == [
        (sites[1].site.site_id, DeclineReason.BUDGET_EXHAUSTED, "ε would reach 3.4")
    ]
    assert any(e.action == "update.decline" and e.actor == f"site:{sites[1].site.site_id}" for e in events)


def test_the_decline_that_completes_a_round_publishes_it_before_it_returns(cluster: Cluster, tmp_path: Path) -> None:
    job_id, sites = _federation_job(cluster, tmp_path, 3, min_sites=2, target_sites=3, round_deadline_s=3600)
    _upload(cluster, sites[0], job_id, 1)
    _upload(cluster, sites[2], job_id, 2)
    with _as_site(cluster, sites[1].site) as as_site:
        as_site.decline_round(job_id, 0, DeclineCreate(reason=DeclineReason.OTHER))
    with cluster.aggregator_admin() as operator:
        published = operator.round(job_id, 0)
        following = operator.round(job_id, 1)
    # The deadline watcher sweeps only every second: PUBLISHED here is the decline's own doing.
    assert published.state == RoundState.PUBLISHED
    assert published.num_submissions == 2
    assert following.state == RoundState.OPEN


def test_a_round_fails_at_once_when_too_few_can_upload(cluster: Cluster, tmp_path: Path) -> None:
    job_id, sites = _federation_job(cluster, tmp_path, 2, min_sites=2, round_deadline_s=3600, on_round_failure="stop")
    _upload(cluster, sites[0], job_id, 3)
    with _as_site(cluster, sites[1].site) as as_site:
        as_site.decline_round(job_id, 0, DeclineCreate(reason=DeclineReason.DATA_PROBLEM, message="no label column"))
    with cluster.aggregator_admin() as operator:
        failed = operator.round(job_id, 0)
        assert operator.job(job_id).status.value == "failed"
    assert failed.state == RoundState.FAILED
    assert failed.failure_reason == "1 uploaded and 1 declined of 2 asked, fewer than min_sites=2"


def _agent_job(cluster: Cluster, tmp_path: Path, num_sites: int) -> tuple[str, list[ProvisionedSite]]:
    with cluster.keyserver_admin() as keyserver:
        federation = keyserver.create_federation(FederationCreate(name="exit-codes"))
    request = job_create(
        federation.key_id,
        name="exit-codes",
        model=model_spec(30),
        rounds=2,
        min_sites=num_sites,
        round_deadline_s=3600,
        batch_size=16,
        max_samples_per_round=10_000,
        on_round_failure="stop",
        secure_aggregation=None,  # exit codes with fewer sites than a secure round needs
    )
    with cluster.aggregator_admin() as operator:
        job_id = operator.create_job(request).id
    sites = [cluster.provision_site(tmp_path, f"exit{index}", federation.id) for index in range(num_sites)]
    return job_id, sites


def _run_agents_once(
    cluster: Cluster, tmp_path: Path, job_id: str, agents: list[tuple[ProvisionedSite, str, Path, dict[str, str], int]]
) -> None:
    """Run each (site, name, data, env, expected exit status) agent with --once until it exits."""
    started = [
        cluster.start_agent(
            site,
            name,
            data_path=data,
            state_dir=tmp_path / name / "state",
            job_id=job_id,
            log_dir=tmp_path / "logs",
            extra_env=env,
        )
        for site, name, data, env, _ in agents
    ]
    try:
        codes = [agent.process.wait(timeout=240) for agent in started]
    finally:
        for agent in started:
            agent.stop()
    assert codes == [expected for *_, expected in agents], [agent.tail() for agent in started]


def test_agent_once_exits_non_zero_and_says_why_when_it_cannot_take_part(cluster: Cluster, tmp_path: Path) -> None:
    job_id, (spent, broken) = _agent_job(cluster, tmp_path, 2)
    pool, _ = split(load_bundled("breast_cancer"), 0.5, seed=1)
    save_csv(pool, tmp_path / "good.csv")
    (tmp_path / "broken.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    (tmp_path / "policy.json").write_text(json.dumps({"max_epsilon": 0.05}), encoding="utf-8")
    policy = {"FEDHE_AGENT_POLICY_FILE": str(tmp_path / "policy.json")}
    _run_agents_once(
        cluster,
        tmp_path,
        job_id,
        [(spent, "spent", tmp_path / "good.csv", policy, 10), (broken, "broken", tmp_path / "broken.csv", {}, 12)],
    )
    with cluster.aggregator_admin() as operator:
        round_ = operator.round(job_id, 0)
        sites = {site.id: site for site in operator.sites()}
    assert {(d.site_id, d.reason) for d in round_.declines} == {
        (spent.site_id, DeclineReason.BUDGET_EXHAUSTED),
        (broken.site_id, DeclineReason.DATA_PROBLEM),
    }
    assert round_.state == RoundState.FAILED
    assert round_.failure_reason == "0 uploaded and 2 declined of 2 asked, fewer than min_sites=2"
    # The data problem's details (file, row, cell) stay at the site; the operator hears only the kind.
    told = next(d.message for d in round_.declines if d.site_id == broken.site_id)
    assert told == DATA_PROBLEM_NOTICE
    assert "broken.csv" in (tmp_path / "logs" / "broken.log").read_text(encoding="utf-8")
    spent_agent = sites[spent.site_id].agent
    assert spent_agent is not None
    assert spent_agent.state == AgentState.DECLINED
    assert "limit 0.05" in spent_agent.message
    assert not (tmp_path / "spent" / "state" / "privacy-ledger.json").exists(), "budget spent on a declined round"


def test_a_custom_model_trains_only_at_sites_that_allow_its_module(cluster: Cluster, tmp_path: Path) -> None:
    """Importing a job's custom model runs code at the site: only modules its admin names may."""
    module = "tests.unit.custom_models"
    with cluster.keyserver_admin() as keyserver:
        federation = keyserver.create_federation(FederationCreate(name="custom-model"))
    model = ModelSpec(architecture="custom", import_path=f"{module}:tiny", input_shape=(30,), num_classes=2)
    request = job_create(
        federation.key_id,
        name="custom-model",
        model=model,
        rounds=1,
        min_sites=1,
        round_deadline_s=3600,
        batch_size=16,
        max_samples_per_round=10_000,
        secure_aggregation=None,
    )
    with cluster.aggregator_admin() as operator:
        job_id = operator.create_job(with_fingerprint(request, [module])).id
    allowing, refusing = (cluster.provision_site(tmp_path, name, federation.id) for name in ("allowing", "refusing"))
    pool, _ = split(load_bundled("breast_cancer"), 0.5, seed=1)
    save_csv(pool, tmp_path / "data.csv")
    allowed = {"FEDHE_AGENT_CUSTOM_MODULES": json.dumps([module])}
    _run_agents_once(
        cluster,
        tmp_path,
        job_id,
        [
            (allowing, "allowing", tmp_path / "data.csv", allowed, 0),
            (refusing, "refusing", tmp_path / "data.csv", {}, 11),
        ],
    )
    with cluster.aggregator_admin() as operator:
        round_ = operator.round(job_id, 0)
    assert [s.site_id for s in round_.submissions] == [allowing.site_id]
    assert [(d.site_id, d.reason) for d in round_.declines] == [(refusing.site_id, DeclineReason.REFUSED)]
    assert "custom_model_not_allowed" in (tmp_path / "logs" / "refusing.log").read_text(encoding="utf-8")


def test_check_data_against_a_running_job_lists_every_problem_before_any_round(
    cluster: Cluster, tmp_path: Path
) -> None:
    """``fedhe agent check-data --job`` asks the real aggregator for the job with the site's credential."""
    job_id, (site,) = _agent_job(cluster, tmp_path, 1)
    pool, _ = split(load_bundled("breast_cancer"), 0.5, seed=1)
    save_csv(pool, tmp_path / "good.csv")
    lines = (tmp_path / "good.csv").read_text(encoding="utf-8").splitlines()
    lines[3] = lines[3].replace(lines[3].split(",")[4], "NaN", 1)
    lines[9] = ",".join(["?", *lines[9].split(",")[1:]])
    (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    flags = [
        sys.executable, "-m", "fedhe.cli", "agent", "check-data", "--job", job_id,
        "--aggregator", cluster.aggregator_url, "--keyserver", cluster.keyserver_url, "--site-id", site.site_id,
        "--credential-file", str(site.credential_file), "--signing-key", str(site.signing_key_file),
    ]  # fmt: skip
    env = {**os.environ, "FEDHE_AGENT_TLS_CA_FILE": str(cluster.secrets.ca_file)}
    bad = subprocess.run(
        [*flags, "--data", str(tmp_path / "bad.csv")], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert bad.returncode == 12, bad.stderr
    assert bad.stdout.splitlines() == [
        f"{tmp_path / 'bad.csv'} does not fit job 'exit-codes': 2 problem(s)",
        f"  - {tmp_path / 'bad.csv'}: row 4, column 'f4': missing value",
        f"  - {tmp_path / 'bad.csv'}: row 10, column 'f0': missing value",
    ]
    good = subprocess.run(
        [*flags, "--data", str(tmp_path / "good.csv")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert good.returncode == 0, good.stderr
    assert (
        good.stdout.splitlines()[0]
        == f"{tmp_path / 'good.csv'} fits job 'exit-codes': 227 training and 57 validation rows"
    )
    with cluster.aggregator_admin() as operator:
        assert operator.round(job_id, 0).declines == []  # checking is not taking part
