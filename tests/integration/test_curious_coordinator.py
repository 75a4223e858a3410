"""The curious coordinator: everything the aggregator side holds, and still no secret context.

The coordinator's people and process hold the aggregator's admin and viewer tokens, its
service token at the keyserver, full write access to the aggregator's database, the site
credentials it issued, and whatever it sees in transit to itself. This test plays each of those
against the keyserver, in every order that could matter, and shows that none yields a secret
context: the keyserver decides membership alone, pins each member's key, and checks every
release against that pin, a fresh nonce and its own audience.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from fedhe.api_client import KeyserverClient
from fedhe.auth import (
    ENDORSE_PURPOSE,
    generate_signing_key,
    sign_request,
)
from fedhe.errors import FedheError, PermissionDenied, Unauthenticated
from fedhe.he import load_evaluation_context
from fedhe.schemas import (
    AccountCreate,
    EndorsementCreate,
    FederationCreate,
    KeyReleaseRequest,
    MemberCreate,
    TokenCreate,
)
from fedhe_demo.local_cluster import ProvisionedSite
from tests.conftest import Cluster
from tests.integration.helpers import database_connection, key_release_request, release_secret


class Coordinator:
    """The aggregator side's credentials, and a record of every attempt on a secret context."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.service_token = cluster.secrets.aggregator_service_token_file.read_text()
        self.admin_token = cluster.secrets.aggregator_admin_token
        self.attempts: list[tuple[str, int]] = []

    def keyserver(self, token: str | None) -> KeyserverClient:
        return KeyserverClient(self.cluster.keyserver_url, token, tls=self.cluster.secrets.tls)

    def try_release(self, label: str, key_id: str, request: KeyReleaseRequest) -> None:
        """One attempt on the secret context; it must be refused."""
        for token in (None, self.service_token, self.admin_token):
            response = httpx.post(
                f"{self.cluster.keyserver_url}/v1/contexts/{key_id}/secret",
                json=request.model_dump(),
                headers={"Authorization": f"Bearer {token}"} if token else {},
                verify=self.cluster.secrets.tls.ssl_context(),
            )
            self.attempts.append((label, response.status_code))
            assert response.status_code in (400, 401, 403, 409, 429), f"{label}: {response.status_code}"
            assert response.headers["content-type"].startswith("application/json")


@pytest.fixture(scope="module")
def federation(cluster: Cluster):
    with cluster.keyserver_admin() as keyserver:
        return keyserver.create_federation(FederationCreate(name="guarded"))


@pytest.fixture(scope="module")
def honest_member(cluster: Cluster, federation, tmp_path_factory: pytest.TempPathFactory) -> ProvisionedSite:
    return cluster.provision_site(tmp_path_factory.mktemp("honest"), "honest", federation.id)


def test_no_sequence_of_coordinator_calls_yields_a_secret_context(
    cluster: Cluster, federation, honest_member: ProvisionedSite, tmp_path: Path
) -> None:
    coordinator = Coordinator(cluster)
    key_id = federation.key_id

    # 1. Register and approve a site of its own at the aggregator, then ask for the key as that site.
    rogue = cluster.provision_site(tmp_path, "rogue", None)
    coordinator.try_release("approved rogue site", key_id, key_release_request(cluster.keyserver_url, rogue, key_id))

    # 2. Use its keyserver service token to make the rogue site a member, or itself an admin.
    with coordinator.keyserver(coordinator.service_token) as as_service:
        for attempt in (
            lambda: as_service.add_member(
                federation.id, MemberCreate(site_id=rogue.site_id, public_key=rogue.public_key)
            ),
            lambda: as_service.create_federation(FederationCreate(name="coordinator-owned")),
            lambda: as_service.rotate_key(federation.id),
            lambda: as_service.create_account(AccountCreate(name="coordinator", role="admin")),
            lambda: as_service.issue_token("bootstrap-admin", TokenCreate()),
            lambda: as_service.disable_account("bootstrap-admin"),
            lambda: as_service.revoke_member(federation.id, honest_member.site_id),
        ):
            with pytest.raises(PermissionDenied):
                attempt()
        assert as_service.whoami().role == "service"
        context = load_evaluation_context(as_service.evaluation_context(key_id))
        assert not context.has_secret_key()

    # 3. Its aggregator tokens mean nothing at the keyserver.
    for token in (coordinator.admin_token, honest_member.credential):
        with coordinator.keyserver(token) as as_other, pytest.raises(Unauthenticated):
            as_other.add_member(federation.id, MemberCreate(site_id=rogue.site_id, public_key=rogue.public_key))

    # 4. Rewrite the honest member's public key in the aggregator's own database, then sign as it.
    with database_connection(cluster.aggregator_database_url) as conn:
        conn.execute(
            text("UPDATE sites SET public_key = :key WHERE id = :site"),
            {"key": rogue.public_key, "site": honest_member.site_id},
        )
        conn.commit()
    impersonation = key_release_request(cluster.keyserver_url, rogue, key_id, site_id=honest_member.site_id)
    coordinator.try_release("member impersonated with a rewritten registry key", key_id, impersonation)

    # 5. Endorse the rogue site in the members' name (it has no member's signing key).
    ts, nonce, sig = sign_request(
        generate_signing_key(), ENDORSE_PURPOSE, cluster.keyserver_url, [federation.id, rogue.site_id, rogue.public_key]
    )
    with coordinator.keyserver(coordinator.service_token) as as_service, pytest.raises(Unauthenticated):
        as_service.endorse_member(
            federation.id,
            rogue.site_id,
            EndorsementCreate(site_id=honest_member.site_id, timestamp=ts, nonce=nonce, signature=sig),
        )

    # 6. Replay a genuine request it saw, aimed at another keyserver (wrong audience) or used once already.
    genuine = key_release_request(cluster.keyserver_url, honest_member, key_id)
    assert release_secret(cluster.keyserver_url, cluster.secrets, genuine, key_id)
    coordinator.try_release("replay of a used request", key_id, genuine)
    elsewhere = key_release_request("https://aggregator.example", honest_member, key_id)
    coordinator.try_release("request signed for another audience", key_id, elsewhere)

    # 7. Path tricks and malformed identities, which used to travel into a URL with the service token.
    for site_id in ("../../../metrics", "site-0000000000000000/../x", "%2e%2e"):
        forged = KeyReleaseRequest.model_construct(
            site_id=site_id, timestamp=int(time.time()), nonce="0" * 32, signature="AA=="
        )
        coordinator.try_release(f"malformed site id {site_id!r}", key_id, forged)

    # 8. Write itself into the membership through its own database: there is no such table there.
    with database_connection(cluster.aggregator_database_url) as conn:
        tables = {row[0] for row in conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))}
    assert not tables & {"members", "contexts", "endorsements"}

    assert len(coordinator.attempts) >= 15
    with cluster.keyserver_admin() as keyserver:
        granted = [
            e.actor
            for e in keyserver.audit_events(1000)
            if e.action == "context.release_secret" and e.subject == key_id and e.detail.get("granted")
        ]
        members = {m.site_id for m in keyserver.members(federation.id)}
    assert granted == [f"site:{honest_member.site_id}"], "only the honest member ever received the key"
    assert members == {honest_member.site_id}


def test_a_member_revoked_by_the_keyserver_cannot_be_restored_by_the_coordinator(
    cluster: Cluster, federation, tmp_path: Path
) -> None:
    member = cluster.provision_site(tmp_path, "revoked-at-keyserver", federation.id)
    with cluster.keyserver_admin() as keyserver:
        keyserver.revoke_member(federation.id, member.site_id)
    with cluster.aggregator_admin() as operator:
        assert operator.site(member.site_id).status.value == "approved"
    with pytest.raises(FedheError) as refused:
        release_secret(
            cluster.keyserver_url,
            cluster.secrets,
            key_release_request(cluster.keyserver_url, member, federation.key_id),
            federation.key_id,
        )
    assert refused.value.code == "not_a_member"
