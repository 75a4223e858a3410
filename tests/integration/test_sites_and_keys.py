"""Site registration, operator decisions, and who may receive which context."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from fedhe.api_client import AggregatorClient, KeyserverClient
from fedhe.auth import generate_signing_key, private_key_from_pem, private_key_to_pem, public_key_b64, sign_key_release
from fedhe.errors import Conflict, PermissionDenied, Unauthenticated
from fedhe.he import load_evaluation_context, load_secret_context
from fedhe.local_cluster import provision_site, write_secret
from fedhe.modelspec import ModelSpec
from fedhe.schemas import FederationCreate, JobCreate, KeyReleaseRequest, SiteCreate, SiteStatus
from tests.conftest import Cluster
from tests.integration.helpers import database_connection, site_codec


@pytest.fixture(scope="module")
def key_id(cluster: Cluster) -> str:
    with cluster.operator_keyserver() as keyserver:
        return keyserver.create_federation(FederationCreate(name="keys")).key_id


def _register(cluster: Cluster, tmp_path: Path, name: str):
    key = generate_signing_key()
    write_secret(tmp_path / f"{name}.pem", private_key_to_pem(key).decode())
    with AggregatorClient(cluster.aggregator_url) as anonymous:
        site = anonymous.register_site(
            SiteCreate(name=name, organisation="org", contact="a@b.example", public_key=public_key_b64(key))
        )
    return site, key


def _release(cluster: Cluster, site_id: str, key, key_id: str, timestamp: int | None = None) -> bytes:
    ts, sig = sign_key_release(key, site_id, key_id, timestamp)
    with KeyserverClient(cluster.keyserver_url) as client:
        return client.secret_context(key_id, KeyReleaseRequest(site_id=site_id, timestamp=ts, signature=sig))


def test_pending_site_gets_403_then_approved_site_gets_the_secret_context(
    cluster: Cluster, key_id: str, tmp_path: Path
) -> None:
    site, key = _register(cluster, tmp_path, "pending-then-approved")
    assert site.status == SiteStatus.PENDING
    with pytest.raises(PermissionDenied) as refused:
        _release(cluster, site.id, key, key_id)
    assert refused.value.code == "site_not_approved"
    with cluster.operator_aggregator() as operator:
        approved = operator.approve_site(site.id)
    assert approved.credential.startswith("fhs_")
    context = load_secret_context(_release(cluster, site.id, key, key_id))
    assert context.has_secret_key()
    with AggregatorClient(cluster.aggregator_url, approved.credential) as as_site:
        assert isinstance(as_site.jobs(), list)


def test_revoked_site_loses_jobs_and_keys_at_once(cluster: Cluster, key_id: str, tmp_path: Path) -> None:
    site = provision_site(cluster.aggregator_url, cluster.secrets.operator_token, tmp_path, "to-revoke")
    site_codec(cluster.keyserver_url, site, key_id)
    with cluster.operator_aggregator() as operator:
        assert operator.revoke_site(site.site_id).status == SiteStatus.REVOKED
        with pytest.raises(Conflict):
            operator.approve_site(site.site_id)
    with AggregatorClient(cluster.aggregator_url, site.credential) as as_site, pytest.raises(PermissionDenied):
        as_site.jobs()
    with pytest.raises(PermissionDenied):
        site_codec(cluster.keyserver_url, site, key_id)


def test_rejected_site_cannot_be_approved_later(cluster: Cluster, tmp_path: Path) -> None:
    site, _ = _register(cluster, tmp_path, "rejected")
    with cluster.operator_aggregator() as operator:
        assert operator.reject_site(site.id).status == SiteStatus.REJECTED
        with pytest.raises(Conflict) as conflict:
            operator.approve_site(site.id)
    assert conflict.value.code == "invalid_site_status"


def test_key_release_needs_a_fresh_signature_by_the_registered_key(
    cluster: Cluster, key_id: str, tmp_path: Path
) -> None:
    site = provision_site(cluster.aggregator_url, cluster.secrets.operator_token, tmp_path, "signer")
    with pytest.raises(Unauthenticated, match="older or newer"):
        _release(
            cluster,
            site.site_id,
            private_key_from_pem(site.signing_key_file.read_bytes()),
            key_id,
            int(time.time()) - 3600,
        )
    with pytest.raises(Unauthenticated, match="does not verify"):
        _release(cluster, site.site_id, generate_signing_key(), key_id)
    with pytest.raises(PermissionDenied) as unknown:
        _release(cluster, "site-unknown", generate_signing_key(), key_id)
    assert unknown.value.code == "site_not_approved"


def test_aggregator_holds_only_keyless_contexts(cluster: Cluster, key_id: str) -> None:
    token = cluster.secrets.service_token_file.read_text()
    with KeyserverClient(cluster.keyserver_url, token) as as_aggregator:
        context = load_evaluation_context(as_aggregator.evaluation_context(key_id))
    assert not context.has_secret_key()
    assert not context.is_private()
    with cluster.operator_aggregator() as operator:
        operator.create_job(
            JobCreate(name="keyless", key_id=key_id, model=ModelSpec(input_dim=2, num_classes=2), min_sites=1)
        )
    with database_connection(cluster.aggregator_database_url) as conn:
        stored = [bytes(row[0]) for row in conn.execute(text("SELECT context FROM evaluation_contexts"))]
    assert stored, "the aggregator stored no evaluation context"
    for data in stored:
        assert not load_evaluation_context(data).has_secret_key()


@pytest.mark.parametrize(
    ("method", "path", "credential", "status"),
    [
        ("GET", "/v1/sites", None, 401),
        ("GET", "/v1/sites", "site", 403),
        ("POST", "/v1/jobs", "site", 403),
        ("GET", "/v1/internal/sites/site-x", "operator", 403),
        ("GET", "/v1/jobs", "Bearer-less", 401),
    ],
)
def test_roles_are_enforced(
    cluster: Cluster, tmp_path: Path, method: str, path: str, credential: str | None, status: int
) -> None:
    headers = {}
    if credential == "site":
        headers["Authorization"] = (
            "Bearer "
            + provision_site(cluster.aggregator_url, cluster.secrets.operator_token, tmp_path, "role").credential
        )
    elif credential == "operator":
        headers["Authorization"] = "Bearer " + cluster.secrets.operator_token
    elif credential == "Bearer-less":
        headers["Authorization"] = "token"
    response = httpx.request(method, cluster.aggregator_url + path, headers=headers, json={})
    assert response.status_code == status
    assert response.json()["error"]["code"] in ("unauthenticated", "permission_denied")


def test_evaluation_context_needs_the_service_credential(cluster: Cluster, key_id: str) -> None:
    response = httpx.get(
        f"{cluster.keyserver_url}/v1/contexts/{key_id}/evaluation",
        headers={"Authorization": f"Bearer {cluster.secrets.operator_token}"},
    )
    assert response.status_code == 401


def test_registration_with_a_bad_public_key_is_a_400_naming_it(cluster: Cluster) -> None:
    response = httpx.post(
        f"{cluster.aggregator_url}/v1/sites",
        json={"name": "x", "organisation": "o", "contact": "c@d.e", "public_key": "not-a-key"},
    )
    assert response.status_code == 400
    assert "public_key" in response.json()["error"]["message"]
    missing = httpx.post(f"{cluster.aggregator_url}/v1/sites", json={"name": "x"})
    assert missing.status_code == 400
    assert {p["location"] for p in missing.json()["error"]["detail"]["problems"]} >= {
        "body.organisation",
        "body.contact",
    }


def test_key_rotation_retires_the_old_key(cluster: Cluster, tmp_path: Path) -> None:
    with cluster.operator_keyserver() as keyserver:
        federation = keyserver.create_federation(FederationCreate(name="rotating"))
        rotated = keyserver.rotate_key(federation.id)
    assert rotated.key_id != federation.key_id
    site = provision_site(cluster.aggregator_url, cluster.secrets.operator_token, tmp_path, "rotation")
    with pytest.raises(Conflict) as stale:
        site_codec(cluster.keyserver_url, site, federation.key_id)
    assert stale.value.code == "stale_key_id"
    site_codec(cluster.keyserver_url, site, rotated.key_id)
    with cluster.operator_aggregator() as operator, pytest.raises(Conflict) as retired:
        operator.create_job(
            JobCreate(name="old-key", key_id=federation.key_id, model=ModelSpec(input_dim=2, num_classes=2))
        )
    assert retired.value.code == "stale_key_id"


def test_every_key_release_granted_or_refused_is_audited(cluster: Cluster, key_id: str, tmp_path: Path) -> None:
    site, key = _register(cluster, tmp_path, "audited")
    with pytest.raises(PermissionDenied):
        _release(cluster, site.id, key, key_id)
    with cluster.operator_aggregator() as operator:
        operator.approve_site(site.id)
    _release(cluster, site.id, key, key_id)
    with cluster.operator_keyserver() as keyserver:
        events = [e for e in keyserver.audit_events(200) if e.actor == f"site:{site.id}"]
    assert [(e.action, e.subject, e.detail.get("granted")) for e in reversed(events)] == [
        ("context.release_secret", key_id, False),
        ("context.release_secret", key_id, True),
    ]
    assert events[1].detail["reason"] == "site_not_approved"
    with cluster.operator_aggregator() as operator:
        actions = {(e.action, e.subject) for e in operator.audit_events(500)}
    assert ("site.register", site.id) in actions
    assert ("site.approved", site.id) in actions
