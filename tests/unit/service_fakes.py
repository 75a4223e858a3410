"""In-process services for the fast tier: the aggregator on SQLite behind a fake keyserver.

``FakeKeyserver`` implements the two Protocols the aggregator's ``create_app`` takes
(``EvaluationContextSource`` and ``MembershipSource``) from a dictionary of members and one key's
material, so the aggregator's cores (``JobCoordinator``, ``UpdateIntake``, ``RoundPublisher``) run
in this process through their real routes, database code and codecs, with no socket and no
Postgres. ``AggregatorClient`` talks to the app through the ``TestClient``'s transport, so the
calls and error mapping are the ones the agent and the CLI make.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient

from aggregator.app import create_app
from aggregator.settings import AggregatorSettings
from fedhe.api_client import AggregatorClient
from fedhe.errors import NotFound
from fedhe.he import KeyMaterial
from fedhe.schemas import ContextInfo, FederationPublic, MemberPublic, MemberStatus
from fedhe.tls import ClientTLS
from tests.factories import SiteIdentity, site_identity

ADMIN_TOKEN = "fht_" + "a" * 40
KEY_ID = "key-" + "1" * 32
FEDERATION_ID = "fed-" + "2" * 16
BASE_URL = "http://testserver"
INSECURE = ClientTLS(insecure_http=True)
CREATED = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


@dataclass
class FakeKeyserver:
    """One federation with one key, and the members the keyserver admin admitted (all active)."""

    material: KeyMaterial
    members_by_site: dict[str, MemberPublic] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def admit(self, site_id: str, identity: SiteIdentity) -> None:
        self.members_by_site[site_id] = MemberPublic(
            federation_id=FEDERATION_ID,
            site_id=site_id,
            name=identity.name,
            public_key=identity.public_key,
            status=MemberStatus.ACTIVE,
            proposed_at=CREATED,
            admitted_at=CREATED,
        )

    def _known(self, key_id: str) -> None:
        if key_id != KEY_ID:
            raise NotFound(f"no key {key_id}")

    # EvaluationContextSource
    def evaluation_context(self, key_id: str) -> bytes:
        self.calls.append(f"evaluation_context {key_id}")
        self._known(key_id)
        return self.material.evaluation_context

    def context_info(self, key_id: str) -> ContextInfo:
        self._known(key_id)
        return ContextInfo(
            key_id=key_id, federation_id=FEDERATION_ID, parameters=self.material.parameters, created_at=CREATED
        )

    # MembershipSource
    def members(self, federation_id: str) -> list[MemberPublic]:
        return [m for m in self.members_by_site.values() if m.federation_id == federation_id]

    def federation(self, federation_id: str) -> FederationPublic:
        if federation_id != FEDERATION_ID:
            raise NotFound(f"no federation {federation_id}")
        return FederationPublic(
            id=FEDERATION_ID,
            name="fake",
            key_id=KEY_ID,
            created_at=CREATED,
            endorsements_required=0,
            bootstrap_complete=True,
            contexts=[self.context_info(KEY_ID)],
        )

    def federations(self) -> list[FederationPublic]:
        return [self.federation(FEDERATION_ID)]


@dataclass
class Site:
    """A registered, approved site: its identity and an aggregator client holding its credential."""

    site_id: str
    identity: SiteIdentity
    credential: str
    client: AggregatorClient


@dataclass
class InProcessAggregator:
    """The aggregator app on SQLite, its fake keyserver and an admin client."""

    app: FastAPI
    http: TestClient
    keyserver: FakeKeyserver
    admin: AggregatorClient
    database_url: str

    def client(self, token: str | None = None) -> AggregatorClient:
        """An aggregator client over the in-process transport (anonymous without ``token``)."""
        return AggregatorClient(BASE_URL, token, tls=INSECURE, transport=self.http._transport)

    def register_and_approve(self, name: str, *, member: bool = True) -> Site:
        """What a site admin and the admins do: register, approve, admit to the federation."""
        identity = site_identity(name)
        with self.client() as anonymous:
            registered = anonymous.register_site(identity.site_create())
        approved = self.admin.approve_site(registered.id)
        if member:
            self.keyserver.admit(registered.id, identity)
        return Site(registered.id, identity, approved.credential, self.client(approved.credential))


@contextmanager
def aggregator_app(tmp_path: Path, material: KeyMaterial, **settings: object) -> Iterator[InProcessAggregator]:
    """The aggregator's ``create_app`` on a fresh SQLite file, lifespan started (deadline watcher included)."""
    keyserver = FakeKeyserver(material)
    database_url = f"sqlite:///{tmp_path}/aggregator.db"
    fields: dict[str, object] = {
        "database_url": database_url,
        "insecure_http": True,
        "keyserver_url": "http://127.0.0.1:9",  # never called: the fake answers for the keyserver
        "keyserver_token": "k" * 32,
        "bootstrap_admin_token": ADMIN_TOKEN,
        "membership_cache_s": 0,
        "sum_workers": 1,
    }
    app = create_app(
        AggregatorSettings.model_validate(fields | settings), context_source=keyserver, membership_source=keyserver
    )
    with TestClient(app, base_url=BASE_URL) as http:
        admin = AggregatorClient(BASE_URL, ADMIN_TOKEN, tls=INSECURE, transport=http._transport)
        yield InProcessAggregator(app, http, keyserver, admin, database_url)


def raw_upload(aggregator: InProcessAggregator, site: Site, job_id: str, number: int, body: bytes) -> httpx.Response:
    """POST an upload body as ``site`` without the client's error mapping (to see the refusal itself)."""
    return aggregator.http.post(
        f"/v1/jobs/{job_id}/rounds/{number}/updates",
        content=body,
        headers={"Content-Type": "application/octet-stream", "Authorization": f"Bearer {site.credential}"},
    )
