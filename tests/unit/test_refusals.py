"""Failure budgets that lock out no valid credential, refusals audited within a budget, security headers.

The integration tests (tests/integration/test_limits.py, test_tls.py) check the same against the
real services over TLS; these check the logic quickly on SQLite and in memory.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from fedhe.accounts import AccountService, Role
from fedhe.auth import KEY_RELEASE_PURPOSE, generate_signing_key, new_token, public_key_b64, sign_request
from fedhe.db import SessionFactory, make_engine
from fedhe.errors import PermissionDenied, TooManyRequests, Unauthenticated
from fedhe.http_auth import Authenticator
from fedhe.http_errors import install_error_handlers
from fedhe.http_limits import AUTH_FAILURES, AUTH_FAILURES_PER_CREDENTIAL
from fedhe.ratelimit import Limit, MemoryCounters, RateLimiter
from fedhe.refusals import ANONYMOUS, Refusal, RefusalAudit, Requester, requester_of
from fedhe.schemas import KeyReleaseRequest, MemberStatus
from fedhe.security_headers import SecurityHeaders
from keyserver.metrics import KeyserverMetrics
from keyserver.nonces import nonce_store_for
from keyserver.repository import KeyserverRepository
from keyserver.sealing import SecretSealer
from keyserver.service import SIGNED_PER_SITE, KeyService
from keyserver.tables import AccountRow, ApiTokenRow, AuditRow, ContextRow, FederationRow, KeyserverBase, MemberRow

FAILURES = 3
AUDITS = 4
ADMIN_TOKEN = new_token("fht_")
KEY_ID = "key-" + "a" * 32
FEDERATION = "fed-" + "b" * 16
MEMBER = "site-" + "c" * 16
AUDIENCE = "https://keyserver.test"


@pytest.fixture
def sessions(tmp_path: Path) -> SessionFactory:
    engine = make_engine(f"sqlite:///{tmp_path}/ks.db")
    KeyserverBase.metadata.create_all(engine)
    return SessionFactory(engine)


def _authenticator(sessions: SessionFactory) -> Authenticator:
    accounts = AccountService(sessions, AccountRow, ApiTokenRow, frozenset(Role), KeyserverRepository)
    accounts.ensure_bootstrap("admin", Role.ADMIN, ADMIN_TOKEN)
    limits = {AUTH_FAILURES: Limit(FAILURES, 60), AUTH_FAILURES_PER_CREDENTIAL: Limit(FAILURES, 60)}
    return Authenticator(accounts, RateLimiter(limits))


def _audit_rows(sessions: SessionFactory) -> list[AuditRow]:
    with sessions.transaction() as session:
        return list(reversed(KeyserverRepository(session).audit_events(1000)))


def test_a_valid_credential_is_never_refused_for_failures_from_its_address(sessions: SessionFactory) -> None:
    authenticator = _authenticator(sessions)
    codes = []
    for guess in range(2 * FAILURES):
        with pytest.raises((Unauthenticated, TooManyRequests)) as refused:
            authenticator.principal("10.0.0.1", f"Bearer fht_guess{guess}")
        codes.append(refused.value.status_code)
    assert codes == [401] * FAILURES + [429] * FAILURES
    assert authenticator.principal("10.0.0.1", f"Bearer {ADMIN_TOKEN}").actor == "account:admin"
    assert authenticator.principal("10.0.0.1", f"Bearer {ADMIN_TOKEN}").role == Role.ADMIN


def test_a_bad_credential_is_limited_wherever_it_comes_from(sessions: SessionFactory) -> None:
    authenticator = _authenticator(sessions)
    for address in range(FAILURES):
        with pytest.raises(Unauthenticated):
            authenticator.principal(f"10.0.1.{address}", "Bearer fht_leaked-and-revoked")
    with pytest.raises(TooManyRequests) as limited:
        authenticator.principal("10.0.2.1", "Bearer fht_leaked-and-revoked")
    assert "auth-failures-per-credential" in limited.value.message
    with pytest.raises(Unauthenticated):  # another credential from that address has its own budget
        authenticator.principal("10.0.2.1", "Bearer fht_another")
    assert authenticator.principal("10.0.2.1", f"Bearer {ADMIN_TOKEN}").name == "admin"


def _refusal_audit(sessions: SessionFactory, registry: CollectorRegistry) -> RefusalAudit:
    return RefusalAudit(
        sessions,
        KeyserverRepository,
        per_minute=AUDITS,
        counters=MemoryCounters(),
        registry=registry,
        routes={"POST /v1/contexts/{key_id}/secret": "context.release_secret"},
    )


def _refusal(requester: Requester, *, status: int = 401, client: str = "10.0.0.9") -> Refusal:
    return Refusal(
        method="POST",
        route="/v1/contexts/{key_id}/secret",
        path_params={"key_id": KEY_ID},
        status=status,
        reason="bad_signature" if status == 401 else "not_found",
        client=client,
        requester=requester,
    )


def test_refusals_are_audited_as_proven_with_claims_and_a_bounded_number_of_rows(sessions: SessionFactory) -> None:
    registry = CollectorRegistry()
    audit = _refusal_audit(sessions, registry)
    forged = Requester(claims={"claimed_site": MEMBER})
    for _ in range(3 * AUDITS):
        audit.record(_refusal(forged))
    audit.record(_refusal(forged, client="10.0.0.10"))  # another address has its own budget
    audit.record(_refusal(Requester(actor=f"site:{MEMBER}"), status=404))  # any 4xx of a named route
    rows = _audit_rows(sessions)
    assert [(r.actor, r.action, r.subject) for r in rows] == [(ANONYMOUS, "context.release_secret", KEY_ID)] * (
        AUDITS + 1
    ) + [(f"site:{MEMBER}", "context.release_secret", KEY_ID)]
    assert rows[0].detail == {
        "granted": False,
        "reason": "bad_signature",
        "status": 401,
        "client": "10.0.0.9",
        "route": "POST /v1/contexts/{key_id}/secret",
        "claimed_site": MEMBER,
    }
    assert 1 <= rows[AUDITS - 1].detail["unaudited_for_s"] <= 60, "the row that spends the budget says so"
    assert "claimed_site" not in rows[-1].detail, "a proven site is the actor, not a claim"
    assert rows[-1].detail["reason"] == "not_found"

    def counted(audited: str) -> float:
        labels = {"action": "context.release_secret", "reason": "bad_signature", "audited": audited}
        return registry.get_sample_value("fedhe_refusals_total", labels) or 0.0

    assert (counted("yes"), counted("no")) == (AUDITS + 1, 2 * AUDITS)


def test_only_refusals_are_audited_and_identifiers_are_not_echoed_unchecked(sessions: SessionFactory) -> None:
    audit = _refusal_audit(sessions, CollectorRegistry())
    assert audit.action("GET", "/v1/federations", 401) == "auth.refused"
    assert audit.action("GET", "/v1/federations", 403) == "access.refused"
    assert audit.action("GET", "/v1/whoami", 429) == "request.throttled"
    assert audit.action("GET", "/v1/federations/{federation_id}", 404) is None
    assert audit.action("GET", "/v1/federations", 409) is None
    hostile = Refusal("GET", "/v1/contexts/{key_id}", {"key_id": "../x\n"}, 401, "unauthenticated", "::1", Requester())
    assert hostile.subject == "<invalid>"
    unnamed = Refusal("GET", "/v1/whoami", {}, 401, "unauthenticated", "::1", Requester())
    assert unnamed.subject == "/v1/whoami"


def _key_service(sessions: SessionFactory, limiter: RateLimiter) -> tuple[KeyService, object]:
    sealer = SecretSealer(base64.b64encode(os.urandom(32)).decode())
    member_key = generate_signing_key()
    with sessions.transaction() as session:
        session.add(FederationRow(id=FEDERATION, name="f", current_key_id=KEY_ID, endorsements_required=0))
        session.flush()
        session.add(
            ContextRow(
                key_id=KEY_ID,
                federation_id=FEDERATION,
                parameters={},
                sealed_secret_context=sealer.seal(KEY_ID, b"secret context"),
                kek_fingerprint=sealer.fingerprint,
                evaluation_context=b"",
            )
        )
        session.add(
            MemberRow(
                federation_id=FEDERATION,
                site_id=MEMBER,
                name="member",
                public_key=public_key_b64(member_key),
                status=MemberStatus.ACTIVE.value,
                proposed_by="account:admin",
            )
        )
    service = KeyService(
        sessions,
        sealer,
        nonce_store_for(None, "fedhe", sessions),
        audience=AUDIENCE,
        max_skew_s=60,
        metrics=KeyserverMetrics(),
        limiter=limiter,
    )
    return service, member_key


def _signed(key: object) -> KeyReleaseRequest:
    timestamp, nonce, signature = sign_request(key, KEY_RELEASE_PURPOSE, AUDIENCE, [KEY_ID])  # type: ignore[arg-type]
    return KeyReleaseRequest(site_id=MEMBER, timestamp=timestamp, nonce=nonce, signature=signature)


def test_forged_key_releases_neither_spend_nor_speak_for_the_member_they_name(sessions: SessionFactory) -> None:
    service, member_key = _key_service(sessions, RateLimiter({SIGNED_PER_SITE: Limit(2, 60)}))
    forger = generate_signing_key()
    for _ in range(10):
        requester = Requester()
        with pytest.raises(Unauthenticated) as refused:
            service.release_secret_context(KEY_ID, _signed(forger), requester)
        assert refused.value.code == "bad_signature"
        assert requester.actor is None, "an unverified request is nobody's"
    genuine = Requester()
    assert service.release_secret_context(KEY_ID, _signed(member_key), genuine) == b"secret context"
    assert genuine.actor == f"site:{MEMBER}"
    service.release_secret_context(KEY_ID, _signed(member_key), Requester())
    over = Requester()
    with pytest.raises(TooManyRequests):  # the member's own budget, spent by its own verified requests
        service.release_secret_context(KEY_ID, _signed(member_key), over)
    assert over.actor == f"site:{MEMBER}"


def _app(hsts_max_age_s: int, sessions: SessionFactory | None = None) -> FastAPI:
    app = FastAPI()

    @app.get("/json")
    def json_answer(request: Request) -> dict[str, str]:
        requester_of(request).actor = "account:someone"
        raise PermissionDenied("no", code="forbidden_role")

    @app.get("/page")
    def page() -> PlainTextResponse:
        return PlainTextResponse("page", headers={"Cache-Control": "no-cache"})

    refusals = _refusal_audit(sessions, CollectorRegistry()) if sessions is not None else None
    install_error_handlers(app, refusals)
    app.add_middleware(SecurityHeaders, hsts_max_age_s=hsts_max_age_s)
    return app


def test_every_answer_carries_the_security_headers_and_https_ones_hsts(sessions: SessionFactory) -> None:
    over_https = TestClient(_app(600, sessions), base_url="https://testserver")
    refused = over_https.get("/json")
    assert refused.status_code == 403
    assert refused.headers["Strict-Transport-Security"] == "max-age=600; includeSubDomains"
    assert refused.headers["X-Content-Type-Options"] == "nosniff"
    assert refused.headers["X-Frame-Options"] == "DENY"
    assert refused.headers["Referrer-Policy"] == "no-referrer"
    assert refused.headers["Cache-Control"] == "no-store"
    assert over_https.get("/page").headers["Cache-Control"] == "no-cache", "a route's own policy is kept"
    assert over_https.get("/missing").headers["X-Frame-Options"] == "DENY"
    assert "Strict-Transport-Security" not in TestClient(_app(600), base_url="http://testserver").get("/page").headers
    assert "Strict-Transport-Security" not in TestClient(_app(0), base_url="https://testserver").get("/page").headers
    [row] = _audit_rows(sessions)
    assert (row.actor, row.action, row.subject) == ("account:someone", "access.refused", "/json")
    assert row.detail["reason"] == "forbidden_role"
    assert row.detail["client"] == "testclient"
