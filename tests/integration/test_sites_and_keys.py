"""Sites, membership and key release on the real services (TLS, Postgres).

The keyserver alone decides who may hold a federation's secret key: its own membership table
with pinned public keys. The aggregator approves sites to talk to it; approval gives no key.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from fedhe.api_client import AggregatorClient, KeyserverClient
from fedhe.auth import (
    ENDORSE_PURPOSE,
    KEY_RELEASE_PURPOSE,
    generate_signing_key,
    private_key_from_pem,
    private_key_to_pem,
    public_key_b64,
    sign_request,
)
from fedhe.errors import Conflict, NotFound, PermissionDenied, Unauthenticated
from fedhe.files import write_private
from fedhe.he import load_evaluation_context, load_secret_context
from fedhe.schemas import (
    EndorsementCreate,
    FederationCreate,
    MemberCreate,
    MemberStatus,
    SiteCreate,
    SiteStatus,
)
from fedhe_demo.local_cluster import ProvisionedSite, admit_member
from tests.conftest import Cluster
from tests.factories import job_create, model_spec
from tests.integration.helpers import database_connection, key_release_request, release_secret, site_codec


@pytest.fixture(scope="module")
def federation(cluster: Cluster):
    with cluster.keyserver_admin() as keyserver:
        return keyserver.create_federation(FederationCreate(name="keys"))


def _release(cluster: Cluster, site: ProvisionedSite, key_id: str, **overrides: object) -> bytes:
    request = key_release_request(cluster.keyserver_url, site, key_id, **overrides)
    return release_secret(cluster.keyserver_url, cluster.secrets, request, key_id)


def test_approval_at_the_aggregator_gives_no_key_membership_at_the_keyserver_does(
    cluster: Cluster, federation, tmp_path: Path
) -> None:
    site = cluster.provision_site(tmp_path, "approved-only", federation_id=None)
    with pytest.raises(PermissionDenied) as refused:
        _release(cluster, site, federation.key_id)
    assert refused.value.code == "not_a_member"
    admit_member(cluster.keyserver_url, cluster.secrets, federation.id, site, "approved-only")
    assert load_secret_context(_release(cluster, site, federation.key_id)).has_secret_key()


def test_a_pending_site_is_refused_everywhere(cluster: Cluster, federation, tmp_path: Path) -> None:
    key = generate_signing_key()
    with AggregatorClient(cluster.aggregator_url, tls=cluster.secrets.tls) as anonymous:
        site = anonymous.register_site(
            SiteCreate(name="pending", organisation="org", contact="a@b.example", public_key=public_key_b64(key))
        )
    assert site.status == SiteStatus.PENDING
    key_file = write_private(tmp_path / "key.pem", private_key_to_pem(key))
    pending = ProvisionedSite(site.id, public_key_b64(key), tmp_path / "no-credential", key_file)
    with pytest.raises(PermissionDenied) as refused:
        _release(cluster, pending, federation.key_id)
    assert refused.value.code == "not_a_member"


def test_revoked_membership_loses_keys_and_revoked_site_loses_jobs(
    cluster: Cluster, federation, tmp_path: Path
) -> None:
    site = cluster.provision_site(tmp_path, "to-revoke", federation.id)
    site_codec(cluster.keyserver_url, cluster.secrets, site, federation.key_id)
    with cluster.keyserver_admin() as keyserver:
        assert keyserver.revoke_member(federation.id, site.site_id).status == MemberStatus.REVOKED
    with pytest.raises(PermissionDenied):
        _release(cluster, site, federation.key_id)
    with cluster.aggregator_admin() as operator:
        assert operator.revoke_site(site.site_id).status == SiteStatus.REVOKED
        with pytest.raises(Conflict):
            operator.approve_site(site.site_id)
    with (
        AggregatorClient(cluster.aggregator_url, site.credential, tls=cluster.secrets.tls) as as_site,
        pytest.raises(PermissionDenied),
    ):
        as_site.jobs()


def test_rejected_site_cannot_be_approved_later(cluster: Cluster, tmp_path: Path) -> None:
    with AggregatorClient(cluster.aggregator_url, tls=cluster.secrets.tls) as anonymous:
        site = anonymous.register_site(
            SiteCreate(
                name="rejected",
                organisation="o",
                contact="a@b.example",
                public_key=public_key_b64(generate_signing_key()),
            )
        )
    with cluster.aggregator_admin() as operator:
        assert operator.reject_site(site.id).status == SiteStatus.REJECTED
        with pytest.raises(Conflict) as conflict:
            operator.approve_site(site.id)
    assert conflict.value.code == "invalid_site_status"


def test_key_release_is_fresh_signed_single_use_and_for_this_keyserver(
    cluster: Cluster, federation, tmp_path: Path
) -> None:
    site = cluster.provision_site(tmp_path, "signer", federation.id)
    key = private_key_from_pem(site.signing_key_file.read_bytes())
    ts, nonce, sig = sign_request(
        key, KEY_RELEASE_PURPOSE, cluster.keyserver_url, [federation.key_id], timestamp=int(time.time()) - 3600
    )
    with pytest.raises(Unauthenticated) as stale:
        _release(cluster, site, federation.key_id, timestamp=ts, nonce=nonce, signature=sig)
    assert stale.value.code == "request_expired"
    forged = key_release_request(cluster.keyserver_url, site, federation.key_id)
    other_key = generate_signing_key()
    ts, nonce, sig = sign_request(other_key, KEY_RELEASE_PURPOSE, cluster.keyserver_url, [federation.key_id])
    with pytest.raises(Unauthenticated) as bad:
        _release(cluster, site, federation.key_id, timestamp=ts, nonce=nonce, signature=sig)
    assert bad.value.code == "bad_signature"
    elsewhere = key_release_request("https://another-keyserver.example", site, federation.key_id)
    with pytest.raises(Unauthenticated) as wrong_audience:
        release_secret(cluster.keyserver_url, cluster.secrets, elsewhere, federation.key_id)
    assert wrong_audience.value.code == "bad_signature"
    assert release_secret(cluster.keyserver_url, cluster.secrets, forged, federation.key_id)
    with pytest.raises(Unauthenticated) as replayed:
        release_secret(cluster.keyserver_url, cluster.secrets, forged, federation.key_id)
    assert replayed.value.code == "replayed_request"


def _client_at(cluster: Cluster, address: str) -> httpx.Client:
    """A client calling from loopback address ``address`` (its own refusal-audit budget, and its own client)."""
    verify = cluster.secrets.tls.ssl_context()
    return httpx.Client(transport=httpx.HTTPTransport(verify=verify, local_address=address), timeout=30)


def test_malformed_site_ids_are_refused_before_any_use_and_audited(cluster: Cluster, federation) -> None:
    address = "127.0.2.1"
    with _client_at(cluster, address) as client:
        for site_id in ["../../../metrics", "site-" + "0" * 15 + "%", "site-\n", "x" * 500]:
            response = client.post(
                f"{cluster.keyserver_url}/v1/contexts/{federation.key_id}/secret",
                json={"site_id": site_id, "timestamp": int(time.time()), "nonce": "0" * 32, "signature": "AA=="},
            )
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == "invalid_request"
    with cluster.keyserver_admin() as keyserver:
        refused = [e for e in keyserver.audit_events(200) if e.detail.get("client") == address]
    assert [(e.actor, e.action, e.subject) for e in refused] == [
        ("anonymous", "context.release_secret", federation.key_id)
    ] * 4
    assert all(
        e.detail
        == {
            "granted": False,
            "reason": "invalid_request",
            "status": 400,
            "client": address,
            "route": "POST /v1/contexts/{key_id}/secret",
        }
        for e in refused
    ), "an identifier that did not validate is not echoed, not even as a claim"


def test_aggregator_holds_only_keyless_contexts(cluster: Cluster, federation) -> None:
    token = cluster.secrets.aggregator_service_token_file.read_text()
    with KeyserverClient(cluster.keyserver_url, token, tls=cluster.secrets.tls) as as_aggregator:
        context = load_evaluation_context(as_aggregator.evaluation_context(federation.key_id))
    assert not context.has_secret_key()
    assert not context.is_private()
    with cluster.aggregator_admin() as operator:
        operator.create_job(
            job_create(federation.key_id, name="keyless", model=model_spec(2), min_sites=1, secure_aggregation=None)
        )
    with database_connection(cluster.aggregator_database_url) as conn:
        stored = [bytes(row[0]) for row in conn.execute(text("SELECT context FROM evaluation_contexts"))]
    assert stored, "the aggregator stored no evaluation context"
    for data in stored:
        assert not load_evaluation_context(data).has_secret_key()


def test_registration_with_a_bad_public_key_is_a_400_naming_it(cluster: Cluster) -> None:
    verify = cluster.secrets.tls.ssl_context()
    response = httpx.post(
        f"{cluster.aggregator_url}/v1/sites",
        json={"name": "x", "organisation": "o", "contact": "c@d.e", "public_key": "not-a-key"},
        verify=verify,
    )
    assert response.status_code == 400
    assert "public_key" in response.json()["error"]["message"]
    missing = httpx.post(f"{cluster.aggregator_url}/v1/sites", json={"name": "x"}, verify=verify)
    assert missing.status_code == 400
    assert {p["location"] for p in missing.json()["error"]["detail"]["problems"]} >= {
        "body.organisation",
        "body.contact",
    }


def test_key_rotation_retires_the_old_key(cluster: Cluster, tmp_path: Path) -> None:
    with cluster.keyserver_admin() as keyserver:
        rotating = keyserver.create_federation(FederationCreate(name="rotating"))
    with cluster.aggregator_admin() as operator:  # the aggregator now holds the old key's context
        operator.create_job(job_create(rotating.key_id, name="before", model=model_spec(2)))
    with cluster.keyserver_admin() as keyserver:
        rotated = keyserver.rotate_key(rotating.id)
    assert rotated.key_id != rotating.key_id
    site = cluster.provision_site(tmp_path, "rotation", rotating.id)
    with pytest.raises(Conflict) as stale:
        site_codec(cluster.keyserver_url, cluster.secrets, site, rotating.key_id)
    assert stale.value.code == "stale_key_id"
    site_codec(cluster.keyserver_url, cluster.secrets, site, rotated.key_id)
    with cluster.aggregator_admin() as operator, pytest.raises(Conflict) as retired:
        operator.create_job(job_create(rotating.key_id, name="old-key", model=model_spec(2)))
    assert retired.value.code == "stale_key_id"


def test_every_key_release_is_audited_granted_under_the_site_refused_as_a_claim(
    cluster: Cluster, federation, tmp_path: Path
) -> None:
    """A refused request is not proof of who sent it: it is the client address's, naming the site as a claim."""
    address = "127.0.2.2"
    site = cluster.provision_site(tmp_path, "audited", federation_id=None)
    with _client_at(cluster, address) as client:
        refused = client.post(
            f"{cluster.keyserver_url}/v1/contexts/{federation.key_id}/secret",
            json=key_release_request(cluster.keyserver_url, site, federation.key_id).model_dump(),
        )
    assert refused.status_code == 403
    admit_member(cluster.keyserver_url, cluster.secrets, federation.id, site, "audited")
    _release(cluster, site, federation.key_id)
    with cluster.keyserver_admin() as keyserver:
        audit = keyserver.audit_events(500)
    events = [e for e in audit if e.actor == f"site:{site.site_id}"]
    claims = [e for e in audit if e.detail.get("claimed_site") == site.site_id]
    admits = [e for e in audit if e.subject == f"{federation.id}/{site.site_id}"]
    assert [(e.action, e.subject, e.detail.get("granted")) for e in events] == [
        ("context.release_secret", federation.key_id, True)
    ]
    assert [(e.actor, e.action, e.subject) for e in claims] == [
        ("anonymous", "context.release_secret", federation.key_id)
    ]
    assert (claims[0].detail["reason"], claims[0].detail["client"]) == ("not_a_member", address)
    assert [(e.action, e.actor) for e in admits] == [("member.admit", "account:bootstrap-admin")]
    with cluster.aggregator_admin() as operator:
        actions = {(e.action, e.subject, e.actor) for e in operator.audit_events(500)}
    assert ("site.register", site.site_id, f"site:{site.site_id}") in actions
    assert ("site.approved", site.site_id, "account:bootstrap-admin") in actions


def _endorse(cluster: Cluster, endorser: ProvisionedSite, federation_id: str, candidate: ProvisionedSite):
    key = private_key_from_pem(endorser.signing_key_file.read_bytes())
    ts, nonce, sig = sign_request(
        key, ENDORSE_PURPOSE, cluster.keyserver_url, [federation_id, candidate.site_id, candidate.public_key]
    )
    with KeyserverClient(cluster.keyserver_url, tls=cluster.secrets.tls) as client:
        return client.endorse_member(
            federation_id,
            candidate.site_id,
            EndorsementCreate(site_id=endorser.site_id, timestamp=ts, nonce=nonce, signature=sig),
        )


def test_with_an_endorsement_rule_k_members_must_sign_a_new_members_key(cluster: Cluster, tmp_path: Path) -> None:
    with cluster.keyserver_admin() as keyserver:
        strict = keyserver.create_federation(FederationCreate(name="two-of-n", endorsements_required=2))
    founders = [cluster.provision_site(tmp_path, f"founder{i}", strict.id) for i in range(2)]
    candidate = cluster.provision_site(tmp_path, "candidate", federation_id=None)
    outsider = cluster.provision_site(tmp_path, "outsider", federation_id=None)
    with cluster.keyserver_admin() as keyserver:
        assert keyserver.federation(strict.id).bootstrap_complete
        proposed = keyserver.add_member(
            strict.id, MemberCreate(site_id=candidate.site_id, public_key=candidate.public_key)
        )
    assert proposed.status == MemberStatus.PROPOSED
    with pytest.raises(PermissionDenied):
        _release(cluster, candidate, strict.key_id)
    with pytest.raises(PermissionDenied) as not_member:
        _endorse(cluster, outsider, strict.id, candidate)
    assert not_member.value.code == "not_a_member"
    assert _endorse(cluster, founders[0], strict.id, candidate).status == MemberStatus.PROPOSED
    with pytest.raises(Conflict) as twice:
        _endorse(cluster, founders[0], strict.id, candidate)
    assert twice.value.code == "duplicate_endorsement"
    admitted = _endorse(cluster, founders[1], strict.id, candidate)
    assert admitted.status == MemberStatus.ACTIVE
    assert sorted(admitted.endorsed_by) == sorted(f.site_id for f in founders)
    assert load_secret_context(_release(cluster, candidate, strict.key_id)).has_secret_key()
    with cluster.keyserver_admin() as keyserver:
        assert {m.site_id: m for m in keyserver.members(strict.id)}[candidate.site_id] == admitted
        keyserver.revoke_member(strict.id, founders[0].site_id)
        keyserver.revoke_member(strict.id, founders[1].site_id)
        late = keyserver.add_member(strict.id, MemberCreate(site_id=outsider.site_id, public_key=outsider.public_key))
    assert late.status == MemberStatus.PROPOSED, "revoking members must not reopen admission by the admin alone"


def test_sites_see_only_their_federations_jobs(cluster: Cluster, tmp_path: Path) -> None:
    with cluster.keyserver_admin() as keyserver:
        fed_a = keyserver.create_federation(FederationCreate(name="fed-a"))
        fed_b = keyserver.create_federation(FederationCreate(name="fed-b"))
    member_a = cluster.provision_site(tmp_path, "member-a", fed_a.id)
    spec = {"model": model_spec(2), "min_sites": 1, "secure_aggregation": None}
    with cluster.aggregator_admin() as operator:
        job_a = operator.create_job(job_create(fed_a.key_id, name="job-a", **spec))
        job_b = operator.create_job(job_create(fed_b.key_id, name="job-b", **spec))
    with AggregatorClient(cluster.aggregator_url, member_a.credential, tls=cluster.secrets.tls) as as_a:
        visible = {job.id for job in as_a.jobs()}
        assert job_a.id in visible
        assert job_b.id not in visible
        assert as_a.job(job_a.id).federation_id == fed_a.id
        for call in (
            lambda: as_a.job(job_b.id),
            lambda: as_a.rounds(job_b.id),
            lambda: as_a.round(job_b.id, 0),
            lambda: as_a.aggregate(job_b.id, 0),
        ):
            with pytest.raises(NotFound):
                call()
    with pytest.raises(PermissionDenied):
        _release(cluster, member_a, fed_b.key_id)
