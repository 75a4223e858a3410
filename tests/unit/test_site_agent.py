"""The site agent (``SiteAgent``) in process: against the in-process aggregator and keyserver, and
against an ``httpx.MockTransport`` aggregator for what it must do when a job does not suit it.

tests/integration/test_federation.py runs three agents as processes over TLS for a whole job;
these run one agent's loop in this process in seconds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from client_agent.agent import SiteAgent
from client_agent.outcomes import OutcomeStatus
from client_agent.settings import AgentSettings
from fedhe.api_client import AggregatorClient, KeyserverClient
from fedhe.auth import private_key_to_pem
from fedhe.environment import current as current_environment
from fedhe.schemas import FederationCreate, JobStatus, RoundState
from tests.factories import SiteIdentity, plain_job_create, site_identity
from tests.unit.service_fakes import (
    BASE_URL,
    INSECURE,
    KEYSERVER_AUDIENCE,
    InProcessKeyserver,
    aggregator_over,
    keyserver_app,
)


def write_rows(path: Path, rows: int, *, seed: int = 0) -> Path:
    """Two separable features and a 0/1 label, as a site's CSV export."""
    generator = np.random.default_rng(seed)
    x = generator.normal(size=(rows, 2))
    label = (x[:, 0] + x[:, 1] > 0).astype(int)
    lines = ["f0,f1,label", *(f"{a:.6f},{b:.6f},{y}" for (a, b), y in zip(x, label, strict=True))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def agent_settings(tmp_path: Path, identity: SiteIdentity, site_id: str, credential: str, job_id: str) -> AgentSettings:
    key_file = tmp_path / "signing-key.pem"
    key_file.write_bytes(private_key_to_pem(identity.signing_key))
    return AgentSettings(
        aggregator_url=BASE_URL,
        keyserver_url=KEYSERVER_AUDIENCE,
        insecure_http=True,
        site_id=site_id,
        credential=credential,
        signing_key_file=key_file,
        data_path=str(write_rows(tmp_path / "data.csv", 120)),
        state_dir=tmp_path / "state",
        job_id=job_id,
        once=True,
        poll_interval_s=0.05,
        round_wait_s=1,
        heartbeat_interval_s=60,
        encrypt_workers=1,
    )


@dataclass
class Federation:
    keyserver: InProcessKeyserver
    aggregator: TestClient
    admin: AggregatorClient
    federation_id: str
    key_id: str


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    with keyserver_app(tmp_path) as keyserver:
        created = keyserver.admin.create_federation(FederationCreate(name="hospitals"))
        source = keyserver.aggregator
        with aggregator_over(tmp_path, source, keyserver_url=KEYSERVER_AUDIENCE) as (_, http, admin, _):
            yield Federation(keyserver, http, admin, created.id, created.key_id)


@pytest.mark.slow  # TensorFlow training and a whole job: seconds of CPU, so in the full run only
def test_an_agent_trains_encrypts_uploads_and_applies_the_published_round(
    tmp_path: Path, federation: Federation
) -> None:
    identity = site_identity("hospital-a")
    with AggregatorClient(BASE_URL, tls=INSECURE, transport=federation.aggregator._transport) as anonymous:
        site_id = anonymous.register_site(identity.site_create()).id
    credential = federation.admin.approve_site(site_id).credential
    federation.keyserver.admin.add_member(federation.federation_id, identity.member_create(site_id))
    job = federation.admin.create_job(
        plain_job_create(federation.key_id, min_sites=1, batch_size=16, min_site_samples=90, max_site_samples=100)
    )
    transport = federation.aggregator._transport
    agent = SiteAgent(
        agent_settings(tmp_path, identity, site_id, credential, job.id),
        aggregator=AggregatorClient(BASE_URL, credential, tls=INSECURE, transport=transport),
        keyserver=KeyserverClient(KEYSERVER_AUDIENCE, tls=INSECURE, transport=federation.keyserver.http._transport),
    )

    [outcome] = agent.run()

    assert outcome.status == OutcomeStatus.COMPLETED, outcome
    assert federation.admin.job(job.id).status == JobStatus.COMPLETED
    published = federation.admin.round(job.id, 0)
    assert (published.state, published.num_submissions) == (RoundState.PUBLISHED, 1)
    [submission] = published.submissions
    assert (submission.site_id, submission.num_samples) == (site_id, 96)  # 120 rows less the 20 % held out
    assert (tmp_path / "state" / f"{job.id}-final.keras").exists()


def test_an_agent_whose_data_does_not_fit_the_job_declines_and_says_why(tmp_path: Path) -> None:
    """A MockTransport aggregator offering a job over three features to a site with two: the agent
    uploads nothing, declines naming its data, and stops taking part."""
    identity = site_identity("hospital-b")
    site_id, job_id, key_id = "site-" + "3" * 16, "job-" + "4" * 16, "key-" + "5" * 32
    job = plain_job_create(key_id, model={"input_shape": [3], "num_classes": 2})
    job_public = {
        **job.model_dump(mode="json"),
        "id": job_id,
        "status": "running",
        "current_round": 0,
        "created_at": "2026-01-01T00:00:00Z",
        "format_id": "bfv-packed-v1",
        "num_parameters": 8,
        "federation_id": "fed-" + "6" * 16,
        "environment": current_environment().model_dump(mode="json"),
    }
    seen: list[tuple[str, str]] = []
    declined: list[dict[str, Any]] = []

    def aggregator(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path))
        if request.url.path.endswith("/declines"):
            declined.append(json.loads(request.content))
        if request.url.path == f"/v1/jobs/{job_id}":
            return httpx.Response(200, json=job_public)
        if request.url.path == "/v1/jobs":
            return httpx.Response(200, json=[job_public])
        if request.method == "POST":
            return httpx.Response(204)
        return httpx.Response(404, json={"error": {"code": "not_found", "message": request.url.path}})

    def keyserver(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path))
        return httpx.Response(500)

    agent = SiteAgent(
        agent_settings(tmp_path, identity, site_id, "fhs_" + "c" * 40, job_id),
        aggregator=AggregatorClient(BASE_URL, "fhs_x", tls=INSECURE, transport=httpx.MockTransport(aggregator)),
        keyserver=KeyserverClient(KEYSERVER_AUDIENCE, tls=INSECURE, transport=httpx.MockTransport(keyserver)),
    )

    [outcome] = agent.run()

    assert outcome.status == OutcomeStatus.DATA_PROBLEM, outcome
    assert not [call for call in seen if call[1].endswith("/updates")], "nothing was uploaded"
    declines = [call for call in seen if call[1].endswith("/declines")]
    assert declines == [("POST", f"/v1/jobs/{job_id}/rounds/0/declines")]
    [decline] = declined
    assert decline["reason"] == "data_problem"
    assert "does not fit the job" in decline["message"]  # the details stay in the site's own log
    assert not [call for call in seen if call[1].startswith("/v1/contexts")], "no key asked for a job it cannot do"
