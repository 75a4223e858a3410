"""In-process services for the fast tier: the aggregator on SQLite behind a fake keyserver, and the keyserver.

``FakeKeyserver`` implements the two Protocols the aggregator's ``create_app`` takes
(``EvaluationContextSource`` and ``MembershipSource``) from a dictionary of members and one key's
material, so the aggregator's cores (``JobCoordinator``, ``UpdateIntake``, ``RoundPublisher``) run
in this process through their real routes, database code and codecs, with no socket and no
Postgres. ``AggregatorClient`` talks to the app through the ``TestClient``'s transport, so the
calls and error mapping are the ones the agent and the CLI make.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient

from aggregator.app import create_app
from aggregator.settings import AggregatorSettings
from fedhe.api_client import AggregatorClient, KeyserverClient
from fedhe.auth import KEY_RELEASE_PURPOSE, sign_request
from fedhe.errors import NotFound
from fedhe.he import KeyMaterial
from fedhe.schemas import ContextInfo, FederationPublic, KeyReleaseRequest, MemberPublic, MemberStatus
from fedhe.tls import ClientTLS
from keyserver.app import create_app as create_keyserver_app
from keyserver.settings import KeyserverSettings
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
def aggregator_over(
    tmp_path: Path, source: Any, **settings: object
) -> Iterator[tuple[FastAPI, TestClient, AggregatorClient, str]]:
    """The aggregator's ``create_app`` on a fresh SQLite file taking contexts and members from
    ``source``, lifespan started (deadline watcher included): the app, its transport, an admin
    client and the database URL."""
    database_url = f"sqlite:///{tmp_path}/aggregator.db"
    fields: dict[str, object] = {
        "database_url": database_url,
        "insecure_http": True,
        "keyserver_url": "http://127.0.0.1:9",  # called only through ``source``
        "keyserver_token": "k" * 32,
        "bootstrap_admin_token": ADMIN_TOKEN,
        "membership_cache_s": 0,
        "sum_workers": 1,
    }
    app = create_app(
        AggregatorSettings.model_validate(fields | settings), context_source=source, membership_source=source
    )
    with TestClient(app, base_url=BASE_URL) as http:
        yield app, http, AggregatorClient(BASE_URL, ADMIN_TOKEN, tls=INSECURE, transport=http._transport), database_url


@contextmanager
def aggregator_app(tmp_path: Path, material: KeyMaterial, **settings: object) -> Iterator[InProcessAggregator]:
    """The aggregator in process behind a fake keyserver (``aggregator_over``)."""
    keyserver = FakeKeyserver(material)
    with aggregator_over(tmp_path, keyserver, **settings) as (app, http, admin, database_url):
        yield InProcessAggregator(app, http, keyserver, admin, database_url)


def raw_upload(aggregator: InProcessAggregator, site: Site, job_id: str, number: int, body: bytes) -> httpx.Response:
    """POST an upload body as ``site`` without the client's error mapping (to see the refusal itself)."""
    return aggregator.http.post(
        f"/v1/jobs/{job_id}/rounds/{number}/updates",
        content=body,
        headers={"Content-Type": "application/octet-stream", "Authorization": f"Bearer {site.credential}"},
    )


KEYSERVER_AUDIENCE = "http://keyserver.test"
AGGREGATOR_SERVICE_TOKEN = "fht_" + "g" * 40


@dataclass
class InProcessKeyserver:
    """The keyserver app on SQLite, with clients for its admin, the aggregator's service identity and sites."""

    http: TestClient
    admin: KeyserverClient
    aggregator: KeyserverClient

    def client(self) -> KeyserverClient:
        """An anonymous client (sites sign their requests instead of presenting a token)."""
        return KeyserverClient(KEYSERVER_AUDIENCE, tls=INSECURE, transport=self.http._transport)


@contextmanager
def keyserver_app(tmp_path: Path) -> Iterator[InProcessKeyserver]:
    """The keyserver's ``create_app`` on a fresh SQLite file, lifespan started."""
    settings = KeyserverSettings(
        database_url=f"sqlite:///{tmp_path}/keyserver.db",
        insecure_http=True,
        public_url=KEYSERVER_AUDIENCE,
        kek=base64.b64encode(b"k" * 32).decode(),
        bootstrap_admin_token=ADMIN_TOKEN,
        aggregator_token=AGGREGATOR_SERVICE_TOKEN,
    )
    app = create_keyserver_app(settings)
    with TestClient(app, base_url=KEYSERVER_AUDIENCE) as http:
        transport = http._transport
        admin = KeyserverClient(KEYSERVER_AUDIENCE, ADMIN_TOKEN, tls=INSECURE, transport=transport)
        aggregator = KeyserverClient(KEYSERVER_AUDIENCE, AGGREGATOR_SERVICE_TOKEN, tls=INSECURE, transport=transport)
        yield InProcessKeyserver(http, admin, aggregator)


def key_release(identity: SiteIdentity, site_id: str, key_id: str, **overrides: object) -> KeyReleaseRequest:
    """The signed key-release request a site's agent sends for ``key_id`` (``overrides`` replace signed fields)."""
    timestamp, nonce, signature = sign_request(identity.signing_key, KEY_RELEASE_PURPOSE, KEYSERVER_AUDIENCE, [key_id])
    fields = {"site_id": site_id, "timestamp": timestamp, "nonce": nonce, "signature": signature}
    return KeyReleaseRequest.model_validate(fields | overrides)
