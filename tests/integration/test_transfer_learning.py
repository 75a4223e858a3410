"""A transfer-learning federation end to end over TLS: a MobileNetV2 pre-trained offline on public
digits (0–4) with ``fedhe pretrain``, a job created from that file with ``fedhe job create
--initial-weights`` training only its head and last block, under DP and secure aggregation, three
sites on other digits (5–9; one site holds the file itself, two download it), then an export.

Checks what the job promises: every site starts from exactly the given weights and ends with the
same model, whose frozen values are still the given ones; uploads carry only the trainable values;
the exported model is that model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import httpx
import numpy as np
import pytest

from client_agent.datasets import Dataset, digits_as_images, partition_iid, write_image_folder
from client_agent.models import build_model, trainable_mask, weights_from_file, weights_sha256
from fedhe.errors import InvalidRequest, NotFound
from fedhe.schemas import FederationCreate, JobPublic, JobStatus
from tests.conftest import Cluster
from tests.factories import job_create
from tests.integration.helpers import finish_agents, stored_uploads

CLASSES = [str(digit) for digit in range(10)]
MODEL = {
    "architecture": "mobilenet_v2",
    "alpha": 0.35,
    "input_shape": [32, 32, 3],
    "num_classes": 10,
    "class_names": CLASSES,
    "normalisation": {"mean": [127.5] * 3, "std": [127.5] * 3},
    "trainable": {"last_blocks": 1},
}
ROUNDS = 1  # one round shows every promise; each more costs three DP-SGD passes over a MobileNet


def _cli(cluster: Cluster, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **cluster.secrets.cli_env(), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "fedhe.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _digits(low: int, high: int) -> Dataset:
    digits = digits_as_images()
    rows = np.flatnonzero((digits.y >= low) & (digits.y <= high))
    return digits.subset(rows)


@pytest.fixture(scope="module")
def transfer(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("transfer")
    write_image_folder(_digits(0, 4), workdir / "public", CLASSES)
    with cluster.keyserver_admin() as keyserver:
        federation = keyserver.create_federation(FederationCreate(name="it-transfer"))
    spec_file = workdir / "job.json"
    spec_file.write_text(
        json.dumps(
            {
                "name": "it-transfer",
                "key_id": federation.key_id,
                "model": MODEL,
                "rounds": ROUNDS,
                "min_sites": 3,
                "round_deadline_s": 300,
                "local_epochs": 1,
                "batch_size": 16,
                "learning_rate": 0.05,
            }
        )
    )
    backbone = workdir / "backbone.keras"
    pretrained = _cli(
        cluster, "pretrain", "--spec", str(spec_file), "--data", str(workdir / "public"), "--out", str(backbone),
        "--epochs", "3",
    )  # fmt: skip
    assert pretrained.returncode == 0, pretrained.stderr
    created = _cli(
        cluster, "job", "create", "--spec", str(spec_file), "--initial-weights", str(backbone), "--json",
        "--aggregator", cluster.aggregator_url,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    job = JobPublic.model_validate_json(created.stdout)

    private = _digits(5, 9)
    sites, agents = [], []
    for index, rows in enumerate(partition_iid(len(private), 3, seed=5)):
        name = f"it-transfer-site{index}"
        site = cluster.provision_site(workdir, name, federation.id)
        write_image_folder(private.subset(rows), workdir / name / "images", CLASSES)
        own = workdir / name / "weights"
        own.mkdir()
        if index == 0:  # this site holds the backbone already and downloads nothing
            (own / "backbone.keras").write_bytes(backbone.read_bytes())
        sites.append(site)
        agents.append(
            cluster.start_agent(
                site,
                name,
                data_path=workdir / name / "images",
                state_dir=workdir / name / "state",
                job_id=job.id,
                log_dir=workdir / "logs",
                extra_env={"FEDHE_AGENT_INITIAL_WEIGHTS_DIR": str(own)},
            )
        )
    finish_agents(agents, timeout_s=600)
    return {
        "job": job,
        "workdir": workdir,
        "backbone": backbone,
        "pretrained": json.loads(pretrained.stdout),
        "sites": sites,
        "logs": [agent.tail(400) for agent in agents],
    }


def test_the_job_starts_from_the_pretrained_file_and_uploads_only_what_trains(
    cluster: Cluster, transfer: dict[str, Any]
) -> None:
    job: JobPublic = transfer["job"]
    given = weights_from_file(job.model, transfer["backbone"])
    assert job.model.initial_weights_sha256 == weights_sha256(given) == transfer["pretrained"]["weights_sha256"]
    assert transfer["pretrained"]["validation_accuracy"] > 0.5  # the backbone learnt its public task
    with cluster.aggregator_admin() as operator:
        assert operator.job(job.id).status is JobStatus.COMPLETED
        stored = [e for e in operator.audit_events(500) if e.action == "initial_weights.store"]
        assert job.model.initial_weights_sha256 in [e.subject for e in stored]
    trainable = job.round_num_values(0)
    assert (trainable, job.num_parameters) == (158_730, 423_018)
    for number in range(ROUNDS):
        uploads = stored_uploads(cluster.aggregator_database_url, job.id, number)
        assert len(uploads) == 3
        for chunks in uploads.values():
            # The packed codec sends ~3.8 bytes a value: a whole-model upload would be ~1.6 MB.
            assert sum(len(c) for c in chunks) < 5 * trainable
    assert "using this site's own backbone.keras" in transfer["logs"][0]
    assert all("using this site's own" not in log for log in transfer["logs"][1:])


def test_every_site_ends_with_one_model_whose_frozen_values_are_the_given_ones(transfer: dict[str, Any]) -> None:
    job: JobPublic = transfer["job"]
    given = weights_from_file(job.model, transfer["backbone"])
    finals = [
        np.load(transfer["workdir"] / f"it-transfer-site{i}" / "state" / f"{job.id}-final-weights.npy")
        for i in range(3)
    ]
    for final in finals[1:]:
        np.testing.assert_array_equal(final, finals[0])
    mask = trainable_mask(build_model(job.model))
    np.testing.assert_array_equal(finals[0][~mask], given[~mask])
    # DP noise moves every trainable value; the few below one quantisation step of the packed codec stay.
    assert np.count_nonzero(finals[0][mask] != given[mask]) > 0.75 * mask.sum()


def test_a_member_exports_the_fine_tuned_model(cluster: Cluster, transfer: dict[str, Any]) -> None:
    job: JobPublic = transfer["job"]
    site, site_dir = transfer["sites"][1], transfer["workdir"] / "it-transfer-site1"
    out = site_dir / "export"
    env = {**os.environ, "FEDHE_AGENT_TLS_CA_FILE": str(cluster.secrets.ca_file), "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [
        sys.executable, "-m", "fedhe.cli", "export", job.id, "--out", str(out),
        "--aggregator", cluster.aggregator_url, "--keyserver", cluster.keyserver_url,
        "--site-id", site.site_id, "--credential-file", str(site.credential_file),
        "--signing-key", str(site.signing_key_file), "--data", str(site_dir / "images"),
        "--state-dir", str(site_dir / "state"), "--tflite", "none",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert str(out / f"{job.id}.keras") in printed["files"]
    assert str(out / f"{job.id}.savedmodel") in printed["files"]
    # Converting a MobileNet to TFLite takes minutes here; tests/unit/test_export.py checks the flavours.
    assert not list(out.glob("*.tflite"))
    assert json.loads((out / f"{job.id}-export-report.json").read_text(encoding="utf-8"))["tflite"] == []
    final = np.load(site_dir / "state" / f"{job.id}-final-weights.npy")
    np.testing.assert_allclose(weights_from_file(job.model, out / f"{job.id}.keras"), final, atol=1e-6)


def test_weights_that_are_not_whole_or_not_stored_are_refused_by_name(
    cluster: Cluster, transfer: dict[str, Any]
) -> None:
    job: JobPublic = transfer["job"]
    vector = np.arange(16, dtype="<f8").tobytes()
    with cluster.aggregator_admin() as operator:
        with pytest.raises(InvalidRequest, match=r"not the .* in the path") as caught:
            operator.upload_initial_weights(vector[:-8], weights_sha256(np.arange(16.0)))
        assert caught.value.code == "initial_weights_mismatch"
        with pytest.raises(NotFound):
            operator.initial_weights("0" * 64, 16)
        assert job.model.fingerprint is not None
        pinned = job.model.fingerprint.model_copy(update={"initial_weights_sha256": "1" * 64})
        unknown = job.model.model_copy(update={"initial_weights_sha256": "1" * 64, "fingerprint": pinned})
        with pytest.raises(InvalidRequest, match="is not stored here") as caught:
            operator.create_job(job_create(job.key_id, name="x", model=unknown, min_sites=3))
        assert caught.value.code == "initial_weights_not_found"
    anonymous = httpx.get(
        f"{cluster.aggregator_url}/v1/initial-weights/{job.model.initial_weights_sha256}",
        verify=cluster.secrets.tls.ssl_context(),
    )
    assert anonymous.status_code == 401
