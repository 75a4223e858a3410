"""A statistics step and two FedProx rounds with real services, agents (DP-SGD, TenSEAL) and Postgres,
under secure aggregation (the default, ADR 0010).

Checks the protocol's central promises: the aggregate the aggregator publishes, once a site
decrypts it and removes the self masks, is the exact sum of the masked uploads it accepted (so
the pairwise masks cancelled and nothing else was added); the statistics step gives every site
the same pooled mean and std, within its Gaussian noise of the true ones; and every site ends
with the same global model, the one the published rounds define.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text

from client_agent.datasets import load_bundled, load_csv, partition_dirichlet, save_csv, split
from client_agent.models import initial_weights
from client_agent.server_momentum import apply_server_momentum, initial_state
from fedhe.he.packing import unpack
from fedhe.he.quantise import dequantise
from fedhe.job_options import Algorithm, AlgorithmSettings, StatisticsSettings
from fedhe.modelspec import InputNormalisation, ModelSpec
from fedhe.privacy import DPSettings
from fedhe.schemas import FederationCreate, JobStatus, RoundState
from fedhe.secagg.masks import self_masks
from fedhe.secagg.statements import RoundAttempt
from tests.conftest import Cluster
from tests.factories import job_create
from tests.integration.helpers import database_connection, decrypted_coefficients, finish_agents, stored_uploads
from tests.integration.secure_sites import ProtocolSite

# The stored uploads, decrypted and summed modulo t with the self masks removed, are the levels the
# published sum holds exactly, so their weighted mean matches the published one up to float64 rounding.
FEDAVG_TOLERANCE = 1e-9
ROUNDS = 2
WEIGHT_SCALE = 400
SERVER_MOMENTUM = 0.5


@pytest.fixture(scope="module")
def finished_federation(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("federation")
    pool, _ = split(load_bundled("breast_cancer"), 0.2, seed=3)
    parts = partition_dirichlet(pool.y, 3, alpha=1.0, seed=3, min_size=64)
    with cluster.keyserver_admin() as keyserver:
        federation = keyserver.create_federation(FederationCreate(name="it-federation"))
    spec = ModelSpec(input_dim=30, hidden_units=[8], num_classes=2)
    request = job_create(
        federation.key_id,
        name="it-two-rounds",
        model=spec,
        rounds=ROUNDS,
        min_sites=3,
        round_deadline_s=240,
        local_epochs=1,
        batch_size=16,
        learning_rate=0.2,
        dp=DPSettings(),
        algorithm=AlgorithmSettings(name=Algorithm.FEDPROX, proximal_mu=0.1, server_momentum=SERVER_MOMENTUM),
        statistics=StatisticsSettings(feature_bounds=(np.abs(pool.x).max(axis=0) * 1.5).tolist()),
        min_eval_sites=3,
        min_site_samples=int(min(len(rows) for rows in parts) * 0.8),
        max_samples_per_round=WEIGHT_SCALE,
    )
    with cluster.aggregator_admin() as operator:
        job = operator.create_job(request)
    sites, agents = [], []
    for index, rows in enumerate(parts):
        name = f"it-site{index}"
        site = cluster.provision_site(workdir, name, federation.id)
        save_csv(pool.subset(rows), workdir / name / "data.csv")
        sites.append(site)
        agents.append(
            cluster.start_agent(
                site,
                name,
                data_path=workdir / name / "data.csv",
                state_dir=workdir / name / "state",
                job_id=job.id,
                log_dir=workdir / "logs",
            )
        )
    finish_agents(agents, timeout_s=300)
    return {"job": job, "sites": sites, "workdir": workdir, "key_id": federation.key_id}


def test_job_completes_with_every_round_published_by_all_sites(cluster: Cluster, finished_federation) -> None:
    job = finished_federation["job"]
    with cluster.aggregator_admin() as operator:
        finished = operator.job(job.id)
        rounds = operator.rounds(job.id)
    assert finished.status == JobStatus.COMPLETED
    assert finished.format_id == "bfv-packed-v1"
    assert finished.privacy_plan is not None
    assert len(finished.privacy_plan.epsilon_per_round) == ROUNDS
    assert [(r.number, r.kind, r.state, r.num_submissions) for r in rounds] == [
        (0, "statistics", RoundState.PUBLISHED, 3),
        *[(n, "training", RoundState.PUBLISHED, 3) for n in range(1, ROUNDS + 1)],
    ]
    site_ids = sorted(s.site_id for s in finished_federation["sites"])
    for r in rounds:
        assert sorted(s.site_id for s in r.submissions) == site_ids
    for r in rounds[1:]:
        assert len(r.evaluations) == 3
        assert all(0.0 <= e.metrics["accuracy"] <= 1.0 for e in r.evaluations)
        assert all(s.metrics["epsilon"] > 0 and 0 <= s.metrics["clipped_fraction"] < 0.01 for s in r.submissions)
        assert r.global_metrics is not None
        examples = sum(e.num_examples for e in r.evaluations)
        weighted = sum(e.metrics["accuracy"] * e.num_examples for e in r.evaluations) / examples
        assert r.global_metrics["accuracy"] == pytest.approx(weighted)


def _member(cluster: Cluster, finished_federation: dict[str, Any]) -> ProtocolSite:
    """A member as the test plays it: it decrypts published rounds through every check an agent makes."""
    site = finished_federation["sites"][0]
    return ProtocolSite(site, cluster.aggregator_url, cluster.keyserver_url, cluster.secrets)


def test_published_aggregate_is_the_exact_sum_of_the_accepted_masked_uploads(
    cluster: Cluster, finished_federation
) -> None:
    job, member = finished_federation["job"], _member(cluster, finished_federation)
    for number in range(1, ROUNDS + 1):
        codec = member.codec(job, number)
        t_mask = np.uint64((1 << codec.layout.plain_modulus_bits) - 1)
        published = member.decrypt_published(job, number)
        uploads = stored_uploads(cluster.aggregator_database_url, job.id, number)
        assert len(uploads) == 3
        summed = sum(decrypted_coefficients(codec, chunks) for chunks in uploads.values()) & t_mask
        transcript = member.received_shares(job, number, 1)
        seeds = {site: base64.b64decode(seed) for site, seed in transcript.self_mask_seeds.items()}
        codec._add_masks(summed, self_masks(RoundAttempt(job.id, number, 1), seeds).negated(), 0)
        total = sum(s.num_samples for s in transcript.statements)
        expected = dequantise(unpack(summed, codec.layout, job.num_parameters), codec.settings) * WEIGHT_SCALE / total
        assert np.max(np.abs(published - expected)) <= FEDAVG_TOLERANCE
        assert np.max(np.abs(expected)) > 0.01
        # Each upload alone, with the member's key, is masked: no slot is a plausible quantised change.
        for chunks in uploads.values():
            alone = unpack(decrypted_coefficients(codec, chunks), codec.layout, job.num_parameters)
            assert np.mean(np.abs(alone) <= codec.layout.levels) < 0.05


def _saved_chain_meta(site_dir: Path, job_id: str) -> dict[str, Any]:
    with np.load(site_dir / "state" / f"{job_id}-global.npz") as saved:
        meta: dict[str, Any] = json.loads(saved["meta"].tobytes())
        return meta


def test_statistics_step_gives_every_site_the_same_noised_pooled_mean_and_std(finished_federation) -> None:
    """Every site holds the same normalisation, within the statistics step's noise of the pooled one:
    means within 6 standard deviations of it, variances within 6 of theirs (or at the noise floor)."""
    job = finished_federation["job"]
    site_dirs = _site_dirs(finished_federation)
    training = [split(load_csv(d / "data.csv"), 0.2, seed=0)[0].x for d in site_dirs]
    pooled = np.concatenate(training)
    held = [_saved_chain_meta(d, job.id)["normalisation"] for d in site_dirs]
    assert all(h == held[0] for h in held)
    bounds = np.asarray(job.statistics.feature_bounds)
    # One standard deviation of the noise in E[z] and in E[z²]: σ·B·√k / n (``normalisation_from_sum``).
    noise = job.statistics.noise_multiplier * job.statistics.row_clip_norm * np.sqrt(3) / len(pooled)
    assert np.all(np.abs(np.array(held[0]["mean"]) - pooled.mean(axis=0)) <= 6 * noise * bounds)
    variance_z = (np.array(held[0]["std"]) / bounds) ** 2
    true_z = pooled.var(axis=0) / bounds**2
    assert np.all(variance_z <= true_z + 6 * noise + 1e-12)
    assert np.all(variance_z >= np.minimum(true_z - 6 * noise, noise) - 1e-12)


def _site_dirs(finished_federation: dict[str, Any]) -> list[Path]:
    dirs = sorted(finished_federation["workdir"].glob("it-site*"))
    assert len(dirs) == 3
    return dirs


def test_every_site_holds_the_global_model_the_published_rounds_define(cluster: Cluster, finished_federation) -> None:
    job, member = finished_federation["job"], _member(cluster, finished_federation)
    state = initial_state(initial_weights(job.model, job.seed))
    for number in range(1, ROUNDS + 1):
        state = apply_server_momentum(
            state, member.decrypt_published(job, number), momentum=SERVER_MOMENTUM, server_learning_rate=1.0
        )
    for site_dir in _site_dirs(finished_federation):
        assert np.load(site_dir / "state" / f"{job.id}-final-weights.npy").tobytes() == state.weights.tobytes()


def test_each_site_ledger_charges_the_statistics_step_and_every_round_once_all_released(finished_federation) -> None:
    job = finished_federation["job"]
    for site_dir in _site_dirs(finished_federation):
        ledger = json.loads((site_dir / "state" / "privacy-ledger.json").read_text())
        assert [(entry["round"], entry["released"]) for entry in ledger] == [(n, True) for n in range(ROUNDS + 1)]
        assert ledger[0]["training"] == {
            "sampling_probability": 1.0,
            "noise_multiplier": job.statistics.noise_multiplier,
            "steps": 1,
        }
        assert (site_dir / "state" / f"{job.id}-final.keras").exists()
        assert not list((site_dir / "state").glob("*-round.*")), "a finished round's record was kept"


def test_site_files_are_private(finished_federation) -> None:
    for site_dir in _site_dirs(finished_federation):
        state = site_dir / "state"
        assert state.stat().st_mode & 0o777 == 0o700
        files = [path for path in state.iterdir() if path.is_file()]
        assert files, "the agent wrote no state"
        assert {path.name: path.stat().st_mode & 0o777 for path in files} == {path.name: 0o600 for path in files}


def test_every_accepted_update_and_publication_is_audited(cluster: Cluster, finished_federation) -> None:
    with database_connection(cluster.aggregator_database_url) as conn:
        actions = conn.execute(
            text("SELECT action, count(*) FROM audit_events WHERE subject = :job GROUP BY action"),
            {"job": finished_federation["job"].id},
        ).all()
    published = ROUNDS + 1  # the statistics step, then the training rounds
    assert dict(actions) == {
        "job.create": 1,
        "round.roster": published,
        "update.accept": 3 * published,
        "unmasking.answer": 3 * published,
        "round.close": published,
        "round.publish": published,
    }


def test_a_member_site_exports_the_final_model_with_normalisation_inside(cluster: Cluster, finished_federation) -> None:
    job, site = finished_federation["job"], finished_federation["sites"][0]
    site_dir = finished_federation["workdir"] / "it-site0"
    out = site_dir / "export"
    command = [
        sys.executable, "-m", "fedhe.cli", "export", job.id, "--out", str(out),
        "--aggregator", cluster.aggregator_url, "--keyserver", cluster.keyserver_url,
        "--site-id", site.site_id, "--credential-file", str(site.credential_file),
        "--signing-key", str(site.signing_key_file), "--data", str(site_dir / "data.csv"),
        "--state-dir", str(site_dir / "state"),
    ]  # fmt: skip
    env = {**os.environ, "FEDHE_AGENT_TLS_CA_FILE": str(cluster.secrets.ca_file), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert out.is_dir(), result.stdout + result.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(
        [
            f"{job.id}.keras",
            f"{job.id}.savedmodel",
            f"{job.id}-float16.tflite",
            f"{job.id}-int8.tflite",
            f"{job.id}-export-report.json",
        ]
    )
    assert all((out / name).stat().st_mode & 0o777 in (0o600, 0o700) for name in files)
    printed = json.loads(result.stdout)
    assert (printed["refused"], printed["report"]) == ([], str(out / f"{job.id}-export-report.json"))
    report = json.loads((out / f"{job.id}-export-report.json").read_text())
    assert [(v["flavour"], v["kept"]) for v in report["tflite"]] == [("float16", True), ("int8", True)]
    assert "float16 TFLite kept" in result.stderr

    import tensorflow as tf

    from client_agent.evaluation import evaluate
    from client_agent.export import probability_model

    raw = load_csv(site_dir / "data.csv")
    exported = tf.keras.models.load_model(out / f"{job.id}.keras").predict(raw.x, verbose=0)
    normalisation = InputNormalisation.model_validate(_saved_chain_meta(site_dir, job.id)["normalisation"])
    spec = job.model.model_copy(update={"normalisation": normalisation})
    weights = np.load(site_dir / "state" / f"{job.id}-final-weights.npy")
    np.testing.assert_allclose(exported, probability_model(spec, weights).predict(raw.x, verbose=0), atol=1e-6)
    accuracy = float((exported.argmax(axis=1) == raw.y).mean())
    assert accuracy == pytest.approx(evaluate(spec, weights, raw)["accuracy"])
    assert accuracy > 0.8  # raw inputs in: the normalisation travels inside the model
