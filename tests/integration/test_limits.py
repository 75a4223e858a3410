"""Limits on everything: body sizes, and request budgets per credential, address and action (429).

The tests share one pair of services and use up its budgets, so their order in this file matters.

A keyserver and an aggregator of their own, started with small budgets, so the test reaches
each limit in a few requests; the shared cluster runs with generous ones.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fedhe.auth import generate_signing_key, public_key_b64
from fedhe.local_cluster import (
    ClusterSecrets,
    ManagedProcess,
    free_port,
    provision_site,
    start_aggregator,
    start_keyserver,
    url,
)
from fedhe.schemas import FederationCreate
from tests.conftest import PostgresDatabases
from tests.integration.helpers import key_release_request

AUTH_FAILURES = 5
REGISTRATIONS = 3
KEY_RELEASES = 4
MAX_BODY = 64 * 1024


@dataclass
class Limited:
    keyserver_url: str
    aggregator_url: str
    secrets: ClusterSecrets
    workdir: Path
    processes: list[ManagedProcess]

    def post(self, base: str, path: str, **kwargs: object) -> httpx.Response:
        return httpx.post(base + path, verify=self.secrets.tls.ssl_context(), timeout=30, **kwargs)  # type: ignore[arg-type]

    def get(self, base: str, path: str, **kwargs: object) -> httpx.Response:
        return httpx.get(base + path, verify=self.secrets.tls.ssl_context(), timeout=30, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def limited(postgres: PostgresDatabases, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Limited]:
    workdir = tmp_path_factory.mktemp("limits")
    secrets = ClusterSecrets.generate(workdir / "secrets")
    ks_port, ag_port = free_port(), free_port()
    common = {"AUTH_FAILURES_PER_ADDRESS": str(AUTH_FAILURES), "MAX_BODY_BYTES": str(MAX_BODY)}
    keyserver = start_keyserver(
        port=ks_port,
        database_url=postgres.create("fedhe_limits_ks"),
        secrets=secrets,
        log_dir=workdir / "logs",
        extra_env={f"FEDHE_KEYSERVER_{k}": v for k, v in common.items()}
        | {"FEDHE_KEYSERVER_KEY_RELEASES_PER_SITE": str(KEY_RELEASES)},
    )
    aggregator = start_aggregator(
        port=ag_port,
        database_url=postgres.create("fedhe_limits_ag"),
        keyserver_url=url(ks_port),
        secrets=secrets,
        log_dir=workdir / "logs",
        extra_env={f"FEDHE_AGGREGATOR_{k}": v for k, v in common.items()}
        | {
            "FEDHE_AGGREGATOR_REGISTRATIONS_PER_ADDRESS": str(REGISTRATIONS),
            "FEDHE_AGGREGATOR_MAX_UPLOAD_BYTES": "200000",
        },
    )
    world = Limited(url(ks_port), url(ag_port), secrets, workdir, [keyserver, aggregator])
    yield world
    for process in world.processes:
        process.stop()


def _registration(name: str) -> dict[str, str]:
    return {
        "name": name,
        "organisation": "o",
        "contact": "a@b.example",
        "public_key": public_key_b64(generate_signing_key()),
    }


def _assert_rate_limited(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "rate_limited"
    assert int(response.headers["Retry-After"]) >= 1


def test_a_json_body_over_the_limit_is_refused_before_it_is_read(limited: Limited) -> None:
    big = b'{"name": "' + b"x" * (MAX_BODY + 1) + b'"}'
    for base in (limited.aggregator_url, limited.keyserver_url):
        response = limited.post(base, "/v1/accounts", content=big, headers={"Content-Type": "application/json"})
        assert response.status_code == 413, response.text
        assert response.json()["error"]["detail"] == {"limit": MAX_BODY}

    def chunked() -> Iterator[bytes]:
        yield b'{"name": "'
        for _ in range(MAX_BODY // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    streamed = limited.post(
        limited.aggregator_url, "/v1/sites", content=chunked(), headers={"Content-Type": "application/json"}
    )
    assert streamed.status_code == 413


def test_uploads_are_not_held_to_the_json_limit(limited: Limited) -> None:
    """An upload over the JSON limit reaches its route, which applies its own (see test_bad_uploads.py)."""
    response = limited.post(
        limited.aggregator_url,
        "/v1/jobs/job-0000000000000000/rounds/0/updates",
        content=b"\0" * (MAX_BODY * 2),
        headers={"Authorization": f"Bearer {limited.secrets.aggregator_admin_token}"},
    )
    assert response.status_code == 403, response.text


def test_signed_key_requests_are_limited_per_site(limited: Limited, tmp_path: Path) -> None:
    with limited.secrets.keyserver_admin(limited.keyserver_url) as keyserver:
        federation = keyserver.create_federation(FederationCreate(name="limited"))
    site = provision_site(
        aggregator_url=limited.aggregator_url,
        keyserver_url=limited.keyserver_url,
        secrets=limited.secrets,
        directory=tmp_path,
        name="eager",
        federation_id=federation.id,
    )
    statuses = []
    for _ in range(KEY_RELEASES + 1):
        request = key_release_request(limited.keyserver_url, site, federation.key_id)
        statuses.append(
            limited.post(limited.keyserver_url, f"/v1/contexts/{federation.key_id}/secret", json=request.model_dump())
        )
        time.sleep(0.05)
    assert [r.status_code for r in statuses[:KEY_RELEASES]] == [200] * KEY_RELEASES
    _assert_rate_limited(statuses[-1])


def test_anonymous_registrations_are_limited_per_address(limited: Limited) -> None:
    responses = [
        limited.post(limited.aggregator_url, "/v1/sites", json=_registration(f"r{index}"))
        for index in range(REGISTRATIONS + 1)
    ]
    statuses = [r.status_code for r in responses]
    assert 429 in statuses, statuses
    first_refusal = statuses.index(429)
    assert set(statuses[:first_refusal]) <= {201}
    assert set(statuses[first_refusal:]) == {429}
    _assert_rate_limited(responses[-1])


def test_guessing_tokens_is_stopped_by_address(limited: Limited) -> None:
    """Last in this module: the address is then locked out of both services for the window."""
    for base in (limited.aggregator_url, limited.keyserver_url):
        statuses = [
            limited.get(base, "/v1/whoami", headers={"Authorization": f"Bearer fht_guess{i}"}).status_code
            for i in range(AUTH_FAILURES)
        ]
        assert statuses == [401] * AUTH_FAILURES
        _assert_rate_limited(limited.get(base, "/v1/whoami", headers={"Authorization": "Bearer fht_guess-again"}))
