"""Limits on everything: body sizes, and request budgets per credential, address and action (429),
none of which locks out a valid credential; refusals audited within their own budget.

The tests share one pair of services and its budgets; each test that uses up a budget calls from a
loopback address of its own (127.0.0.x), and each checks only the audit rows it caused, so they pass
alone and in any order.

A keyserver and an aggregator of their own, started with small budgets, so the test reaches
each limit in a few requests; the shared cluster runs with generous ones.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fedhe.auth import ENDORSE_PURPOSE, KEY_RELEASE_PURPOSE, generate_signing_key, public_key_b64, sign_request
from fedhe.schemas import AccountCreate, AuditEventPublic, FederationCreate, TokenCreate
from fedhe_demo.local_cluster import (
    ClusterSecrets,
    ManagedProcess,
    free_port,
    provision_site,
    start_aggregator,
    start_keyserver,
    url,
)
from tests.conftest import PostgresDatabases
from tests.integration.helpers import key_release_request

AUTH_FAILURES = 5
REGISTRATIONS = 3
KEY_RELEASES = 4
MAX_BODY = 64 * 1024
REFUSAL_AUDITS = 3
AGGREGATOR_HSTS_S = 600


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

    def client_at(self, address: str) -> httpx.Client:
        """A client calling from loopback address ``address``, so the services see that client address."""
        verify = self.secrets.tls.ssl_context()
        return httpx.Client(transport=httpx.HTTPTransport(verify=verify, local_address=address), timeout=30)

    def audit(self, service: str) -> list[AuditEventPublic]:
        if service == "keyserver":
            with self.secrets.keyserver_admin(self.keyserver_url) as admin:
                return admin.audit_events(1000)
        with self.secrets.aggregator_admin(self.aggregator_url) as admin:
            return admin.audit_events(1000)


@pytest.fixture(scope="module")
def limited(postgres: PostgresDatabases, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Limited]:
    workdir = tmp_path_factory.mktemp("limits")
    secrets = ClusterSecrets.generate(workdir / "secrets")
    ks_port, ag_port = free_port(), free_port()
    common = {
        "AUTH_FAILURES_PER_ADDRESS": str(AUTH_FAILURES),
        "MAX_BODY_BYTES": str(MAX_BODY),
        "REFUSAL_AUDITS_PER_MINUTE": str(REFUSAL_AUDITS),
    }
    keyserver = start_keyserver(
        port=ks_port,
        database_url=postgres.create("fedhe_limits_ks"),
        secrets=secrets,
        log_dir=workdir / "logs",
        extra_env={f"FEDHE_KEYSERVER_{k}": v for k, v in common.items()}
        | {"FEDHE_KEYSERVER_KEY_RELEASES_PER_SITE": str(KEY_RELEASES), "FEDHE_KEYSERVER_HSTS_MAX_AGE_S": "0"},
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
            "FEDHE_AGGREGATOR_HSTS_MAX_AGE_S": str(AGGREGATOR_HSTS_S),
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
    refused = [e for e in limited.audit("aggregator") if e.action == "update.upload"]
    assert [(e.actor, e.subject, e.detail["reason"], e.detail["status"]) for e in refused] == [
        ("account:bootstrap-admin", "job-0000000000000000/0", "forbidden_role", 403)
    ]


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


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _metric(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def test_forged_key_releases_naming_a_member_neither_lock_it_out_nor_speak_for_it(
    limited: Limited, tmp_path: Path
) -> None:
    """A forger needs no key to name a member: its requests spend the forger's address budget, not the
    member's, and are audited as anonymous claims from the forger's address, a bounded number of rows."""
    forger_address = "127.0.0.20"
    with limited.secrets.keyserver_admin(limited.keyserver_url) as keyserver:
        federation = keyserver.create_federation(FederationCreate(name="forged"))
    victim = provision_site(
        aggregator_url=limited.aggregator_url,
        keyserver_url=limited.keyserver_url,
        secrets=limited.secrets,
        directory=tmp_path,
        name="victim",
        federation_id=federation.id,
    )
    path = f"{limited.keyserver_url}/v1/contexts/{federation.key_id}/secret"
    forger = generate_signing_key()
    forged = 2 * KEY_RELEASES  # more than the member's own budget
    with limited.client_at(forger_address) as client:
        refusals = []
        for _ in range(forged):
            ts, nonce, signature = sign_request(forger, KEY_RELEASE_PURPOSE, limited.keyserver_url, [federation.key_id])
            body = {"site_id": victim.site_id, "timestamp": ts, "nonce": nonce, "signature": signature}
            response = client.post(path, json=body)
            refusals.append((response.status_code, response.json()["error"]["code"]))
        genuine = client.post(
            path, json=key_release_request(limited.keyserver_url, victim, federation.key_id).model_dump()
        )
        metrics = client.get(f"{limited.keyserver_url}/metrics").text
    assert refusals == [(401, "bad_signature")] * forged
    assert genuine.status_code == 200, genuine.text
    assert genuine.content

    events = limited.audit("keyserver")
    claims = [e for e in events if e.detail.get("claimed_site") == victim.site_id]
    assert len(claims) == REFUSAL_AUDITS, "a flood writes a bounded number of rows"
    assert {(e.actor, e.action, e.subject) for e in claims} == {
        ("anonymous", "context.release_secret", federation.key_id)
    }
    assert {(e.detail["client"], e.detail["reason"], e.detail["status"], e.detail["granted"]) for e in claims} == {
        (forger_address, "bad_signature", 401, False)
    }
    assert 1 <= claims[0].detail["unaudited_for_s"] <= 60, "the newest row says later ones went unwritten"
    assert [(e.action, e.detail["granted"]) for e in events if e.actor == f"site:{victim.site_id}"] == [
        ("context.release_secret", True)
    ], "nothing but the member's own verified request is under its name"
    labels = {"action": "context.release_secret", "reason": "bad_signature"}
    assert _metric(metrics, "fedhe_refusals_total", **labels, audited="yes") == REFUSAL_AUDITS
    assert _metric(metrics, "fedhe_refusals_total", **labels, audited="no") == forged - REFUSAL_AUDITS
    assert _metric(metrics, "fedhe_key_releases_total", outcome="bad_signature") == forged


def test_refused_actions_on_both_services_are_audited_with_who_where_and_why_within_a_budget(
    limited: Limited, tmp_path: Path
) -> None:
    flood_address, signer_address = "127.0.0.30", "127.0.0.31"
    with limited.secrets.keyserver_admin(limited.keyserver_url) as keyserver:
        federation = keyserver.create_federation(FederationCreate(name="refusals"))
    member = provision_site(
        aggregator_url=limited.aggregator_url,
        keyserver_url=limited.keyserver_url,
        secrets=limited.secrets,
        directory=tmp_path,
        name="refused",
        federation_id=federation.id,
    )
    with limited.secrets.aggregator_admin(limited.aggregator_url) as admin:
        admin.create_account(AccountCreate(name="auditor", role="viewer"))
        viewer_token = admin.issue_token("auditor", TokenCreate(label="refusals")).token
    flood = 3 * AUTH_FAILURES
    with limited.client_at(flood_address) as client:
        for base, path in ((limited.aggregator_url, "/v1/jobs"), (limited.keyserver_url, "/v1/federations")):
            statuses = [client.get(base + path, headers=_bearer(f"fht_flood{i}")).status_code for i in range(flood)]
            assert statuses == [401] * AUTH_FAILURES + [429] * (flood - AUTH_FAILURES)
    viewer_refused = limited.post(
        limited.aggregator_url, "/v1/accounts", json={"name": "nope", "role": "admin"}, headers=_bearer(viewer_token)
    )
    assert viewer_refused.status_code == 403
    missing_job = "job-" + "0" * 16
    upload_refused = limited.post(
        limited.aggregator_url,
        f"/v1/jobs/{missing_job}/rounds/0/updates",
        content=b"not an envelope",
        headers=_bearer(member.credential),
    )
    assert upload_refused.status_code == 404
    candidate = "site-" + "0" * 16
    forger = generate_signing_key()
    ts, nonce, signature = sign_request(forger, ENDORSE_PURPOSE, limited.keyserver_url, [federation.id, candidate, ""])
    with limited.client_at(signer_address) as client:
        endorsement = client.post(
            f"{limited.keyserver_url}/v1/federations/{federation.id}/members/{candidate}/endorsements",
            json={"site_id": member.site_id, "timestamp": ts, "nonce": nonce, "signature": signature},
        )
    assert endorsement.status_code == 401

    for service, path in (("aggregator", "/v1/jobs"), ("keyserver", "/v1/federations")):
        events = limited.audit(service)
        assert "fht_flood" not in str([e.model_dump() for e in events]), "no presented credential is kept"
        flooded = [e for e in events if e.detail.get("client") == flood_address]
        by_action = {
            action: [
                (e.actor, e.subject, e.detail["reason"], e.detail["status"]) for e in flooded if e.action == action
            ]
            for action in ("auth.refused", "request.throttled")
        }
        assert by_action == {
            "auth.refused": [("anonymous", path, "unauthenticated", 401)] * REFUSAL_AUDITS,
            "request.throttled": [("anonymous", path, "rate_limited", 429)] * REFUSAL_AUDITS,
        }, f"{service}: at most {REFUSAL_AUDITS} rows per address and action, whatever the flood"
    aggregator = limited.audit("aggregator")
    [denied] = [e for e in aggregator if e.actor == "account:auditor"]
    assert (denied.action, denied.subject, denied.detail["reason"], denied.detail["status"]) == (
        "access.refused",
        "/v1/accounts",
        "forbidden_role",
        403,
    )
    assert denied.detail["client"] == "127.0.0.1"
    uploads = [
        (e.actor, e.subject, e.detail["reason"], e.detail["status"])
        for e in aggregator
        if e.action == "update.upload" and e.actor == f"site:{member.site_id}"
    ]
    assert uploads == [(f"site:{member.site_id}", f"{missing_job}/0", "not_found", 404)]
    [refused_endorsement] = [e for e in limited.audit("keyserver") if e.action == "member.endorse"]
    assert (refused_endorsement.actor, refused_endorsement.subject) == ("anonymous", f"{federation.id}/{candidate}")
    assert refused_endorsement.detail == {
        "granted": False,
        "reason": "bad_signature",
        "status": 401,
        "client": signer_address,
        "route": "POST /v1/federations/{federation_id}/members/{site_id}/endorsements",
        "claimed_site": member.site_id,
    }


def test_hsts_max_age_is_configurable_and_zero_sends_none(limited: Limited) -> None:
    aggregator = limited.get(limited.aggregator_url, "/healthz")
    assert aggregator.headers["Strict-Transport-Security"] == f"max-age={AGGREGATOR_HSTS_S}; includeSubDomains"
    keyserver = limited.get(limited.keyserver_url, "/healthz")
    assert "Strict-Transport-Security" not in keyserver.headers
    assert keyserver.headers["X-Frame-Options"] == "DENY", "the other headers do not depend on HSTS"


def test_anonymous_registrations_are_limited_per_address(limited: Limited) -> None:
    """From an address of its own (the other tests register their sites from 127.0.0.1): exactly the
    budget's registrations pass, whichever tests ran before, and another address is not held to it."""
    with limited.client_at("127.0.0.50") as client:
        responses = [
            client.post(f"{limited.aggregator_url}/v1/sites", json=_registration(f"r{index}"))
            for index in range(REGISTRATIONS + 1)
        ]
    assert [r.status_code for r in responses] == [201] * REGISTRATIONS + [429], [r.text for r in responses]
    _assert_rate_limited(responses[-1])
    with limited.client_at("127.0.0.51") as client:
        assert client.post(f"{limited.aggregator_url}/v1/sites", json=_registration("elsewhere")).status_code == 201


def test_guessing_tokens_is_stopped_but_never_locks_out_a_valid_token(limited: Limited) -> None:
    """Failures are limited per address and per presented credential; a valid token is always accepted."""
    tokens = {
        limited.aggregator_url: limited.secrets.aggregator_admin_token,
        limited.keyserver_url: limited.secrets.keyserver_admin_token,
    }
    for base, token in tokens.items():
        with limited.client_at("127.0.0.40") as guesser:
            statuses = [
                guesser.get(f"{base}/v1/whoami", headers=_bearer(f"fht_guess{i}")).status_code
                for i in range(AUTH_FAILURES)
            ]
            assert statuses == [401] * AUTH_FAILURES
            _assert_rate_limited(guesser.get(f"{base}/v1/whoami", headers=_bearer("fht_guess-again")))
            admin = guesser.get(f"{base}/v1/whoami", headers=_bearer(token))
            assert admin.status_code == 200, admin.text
            assert admin.json()["name"] == "bootstrap-admin"
        for address in range(AUTH_FAILURES):  # one bad credential from many addresses
            with limited.client_at(f"127.0.1.{address + 1}") as client:
                assert client.get(f"{base}/v1/whoami", headers=_bearer("fht_leaked")).status_code == 401
        with limited.client_at("127.0.1.100") as client:
            _assert_rate_limited(client.get(f"{base}/v1/whoami", headers=_bearer("fht_leaked")))
            assert client.get(f"{base}/v1/whoami", headers=_bearer(token)).status_code == 200
