"""Every route of both services × every kind of caller gets exactly what the authorisation rules say.

The routes come from the services' own OpenAPI documents, so a route added without a rule here
fails ``test_every_route_has_a_rule``. Each cell sends a real request over TLS and checks the
status: a denied caller gets exactly 401, 403 or 404 (to a site, jobs of federations it is not
a member of do not exist); an allowed caller passes authorisation (any status but 401/403, and
never a 5xx). Allowed requests carry a deliberately invalid body or point at throw-away objects,
so the matrix changes nothing the other cells depend on.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from fedhe.auth import (
    ENDORSE_PURPOSE,
    KEY_RELEASE_PURPOSE,
    PINNED_KEYS_PURPOSE,
    generate_signing_key,
    private_key_from_pem,
    private_key_to_pem,
    public_key_b64,
    sign_request,
)
from fedhe.files import write_private
from fedhe.schemas import AccountCreate, FederationCreate, SiteCreate, TokenCreate
from fedhe_demo.local_cluster import ProvisionedSite
from tests.conftest import Cluster
from tests.factories import job_create, model_spec

ACTORS = (
    "anonymous",
    "pending",
    "member",
    "non_member",
    "revoked",
    "rejected",
    "viewer",
    "operator",
    "keyserver_admin",
    "service",
    "garbage",
)
SITES = {"member", "non_member"}
NO_AGGREGATOR_IDENTITY = {"anonymous", "pending", "rejected", "garbage", "keyserver_admin", "service"}
KEYSERVER_IDENTITIES = {"keyserver_admin", "service"}
SIGNERS_WITH_OWN_KEY = {"pending", "non_member", "revoked", "rejected"}

ALLOW = "allow"
Rule = dict[str, int | str]


def aggregator_rule(*allowed: str, scoped: bool = False) -> Rule:
    """Bearer-token route of the aggregator open to ``allowed`` (``scoped``: jobs of the site's federations)."""
    rule: Rule = {}
    for actor in ACTORS:
        if actor in allowed:
            rule[actor] = ALLOW
        elif actor == "non_member" and scoped and "member" in allowed:
            rule[actor] = 404
        elif actor in NO_AGGREGATOR_IDENTITY:
            rule[actor] = 401
        else:
            rule[actor] = 403
    return rule


def keyserver_rule(*allowed: str) -> Rule:
    """Bearer-token route of the keyserver open to ``allowed``; aggregator and site credentials mean nothing there."""
    return {actor: ALLOW if actor in allowed else (403 if actor in KEYSERVER_IDENTITIES else 401) for actor in ACTORS}


def signed_rule() -> Rule:
    """A route authenticated by a member's signature: only an active member gets through."""
    return {actor: ALLOW if actor == "member" else (403 if actor in SIGNERS_WITH_OWN_KEY else 401) for actor in ACTORS}


PUBLIC: Rule = dict.fromkeys(ACTORS, ALLOW)
OPERATORS = ("operator", "viewer")

AGGREGATOR_RULES: dict[tuple[str, str], Rule] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("GET", "/dashboard"): PUBLIC,
    ("GET", "/dashboard/assets/{name}"): PUBLIC,
    ("POST", "/v1/sites"): PUBLIC,
    ("GET", "/v1/sites"): aggregator_rule(*OPERATORS),
    ("GET", "/v1/sites/{site_id}"): aggregator_rule(*OPERATORS),
    ("POST", "/v1/sites/{site_id}/approve"): aggregator_rule("operator"),
    ("POST", "/v1/sites/{site_id}/reject"): aggregator_rule("operator"),
    ("POST", "/v1/sites/{site_id}/revoke"): aggregator_rule("operator"),
    ("GET", "/v1/federations"): aggregator_rule(*OPERATORS),
    ("POST", "/v1/jobs"): aggregator_rule("operator"),
    ("GET", "/v1/jobs"): aggregator_rule(*OPERATORS, "member", "non_member"),
    ("GET", "/v1/jobs/{job_id}"): aggregator_rule(*OPERATORS, "member", scoped=True),
    ("POST", "/v1/jobs/{job_id}/stop"): aggregator_rule("operator"),
    ("GET", "/v1/jobs/{job_id}/rounds"): aggregator_rule(*OPERATORS, "member", scoped=True),
    ("GET", "/v1/jobs/{job_id}/rounds/{number}"): aggregator_rule(*OPERATORS, "member", scoped=True),
    ("GET", "/v1/jobs/{job_id}/rounds/{number}/verify"): aggregator_rule(*OPERATORS),
    ("GET", "/v1/jobs/{job_id}/rounds/{number}/aggregate"): aggregator_rule("member", scoped=True),
    ("POST", "/v1/jobs/{job_id}/rounds/{number}/updates"): aggregator_rule("member", scoped=True),
    ("POST", "/v1/jobs/{job_id}/rounds/{number}/evaluations"): aggregator_rule("member", scoped=True),
    ("POST", "/v1/jobs/{job_id}/rounds/{number}/declines"): aggregator_rule("member", scoped=True),
    ("POST", "/v1/jobs/{job_id}/rounds/{number}/keys"): aggregator_rule("member", scoped=True),
    ("GET", "/v1/jobs/{job_id}/rounds/{number}/transcript"): aggregator_rule(*OPERATORS, "member", scoped=True),
    ("POST", "/v1/jobs/{job_id}/rounds/{number}/unmasking"): aggregator_rule("member", scoped=True),
    ("POST", "/v1/sites/me/heartbeat"): aggregator_rule("member", "non_member"),
    ("PUT", "/v1/initial-weights/{sha256}"): aggregator_rule("operator"),
    ("GET", "/v1/initial-weights/{sha256}"): aggregator_rule(*OPERATORS, "member", "non_member"),
    ("GET", "/v1/events"): aggregator_rule(*OPERATORS),
    ("GET", "/v1/audit"): aggregator_rule(*OPERATORS),
    ("GET", "/v1/whoami"): aggregator_rule(*OPERATORS, "member", "non_member"),
    ("POST", "/v1/sessions"): aggregator_rule(*OPERATORS),
    ("GET", "/v1/accounts"): aggregator_rule("operator"),
    ("POST", "/v1/accounts"): aggregator_rule("operator"),
    ("POST", "/v1/accounts/{name}/disable"): aggregator_rule("operator"),
    ("GET", "/v1/accounts/{name}/tokens"): aggregator_rule("operator"),
    ("POST", "/v1/accounts/{name}/tokens"): aggregator_rule("operator"),
    ("POST", "/v1/tokens/{token_id}/revoke"): aggregator_rule("operator"),
}
KEYSERVER_RULES: dict[tuple[str, str], Rule] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/readyz"): PUBLIC,
    ("GET", "/metrics"): PUBLIC,
    ("POST", "/v1/federations"): keyserver_rule("keyserver_admin"),
    ("GET", "/v1/federations"): keyserver_rule("keyserver_admin", "service"),
    ("GET", "/v1/federations/{federation_id}"): keyserver_rule("keyserver_admin", "service"),
    ("POST", "/v1/federations/{federation_id}/rotate"): keyserver_rule("keyserver_admin"),
    ("GET", "/v1/federations/{federation_id}/members"): keyserver_rule("keyserver_admin", "service"),
    ("POST", "/v1/federations/{federation_id}/members"): keyserver_rule("keyserver_admin"),
    ("POST", "/v1/federations/{federation_id}/members/{site_id}/revoke"): keyserver_rule("keyserver_admin"),
    ("POST", "/v1/federations/{federation_id}/members/{site_id}/endorsements"): signed_rule(),
    ("GET", "/v1/contexts/{key_id}"): keyserver_rule("keyserver_admin", "service"),
    ("GET", "/v1/contexts/{key_id}/evaluation"): keyserver_rule("service"),
    ("POST", "/v1/contexts/{key_id}/secret"): signed_rule(),
    ("POST", "/v1/contexts/{key_id}/members"): signed_rule(),
    ("GET", "/v1/audit"): keyserver_rule("keyserver_admin"),
    ("GET", "/v1/whoami"): keyserver_rule("keyserver_admin", "service"),
    ("POST", "/v1/sessions"): keyserver_rule("keyserver_admin"),
    ("GET", "/v1/accounts"): keyserver_rule("keyserver_admin"),
    ("POST", "/v1/accounts"): keyserver_rule("keyserver_admin"),
    ("POST", "/v1/accounts/{name}/disable"): keyserver_rule("keyserver_admin"),
    ("GET", "/v1/accounts/{name}/tokens"): keyserver_rule("keyserver_admin"),
    ("POST", "/v1/accounts/{name}/tokens"): keyserver_rule("keyserver_admin"),
    ("POST", "/v1/tokens/{token_id}/revoke"): keyserver_rule("keyserver_admin"),
}
SIGNED_ROUTES = {
    "/v1/federations/{federation_id}/members/{site_id}/endorsements": ENDORSE_PURPOSE,
    "/v1/contexts/{key_id}/secret": KEY_RELEASE_PURPOSE,
    "/v1/contexts/{key_id}/members": PINNED_KEYS_PURPOSE,
}


@dataclass
class World:
    """Everything the cells need: the callers' credentials and the objects routes point at."""

    cluster: Cluster
    tokens: dict[str, str | None]
    signers: dict[str, ProvisionedSite]
    params: dict[str, dict[str, str]]


def _operation_routes(url: str, verify: Any) -> set[tuple[str, str]]:
    document = httpx.get(f"{url}/openapi.json", verify=verify).json()
    return {(method.upper(), path) for path, item in document["paths"].items() for method in item}


@pytest.fixture(scope="module")
def world(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> World:
    workdir = tmp_path_factory.mktemp("matrix")

    def site(name: str, federation_id: str | None) -> ProvisionedSite:
        return cluster.provision_site(workdir, name, federation_id)

    def registered(name: str) -> ProvisionedSite:
        key = generate_signing_key()
        key_file = write_private(workdir / f"{name}.pem", private_key_to_pem(key))
        with httpx.Client(verify=cluster.secrets.tls.ssl_context()) as http:
            response = http.post(
                f"{cluster.aggregator_url}/v1/sites",
                json=SiteCreate(
                    name=name, organisation="o", contact="a@b.example", public_key=public_key_b64(key)
                ).model_dump(),
            )
        return ProvisionedSite(response.json()["id"], public_key_b64(key), workdir / "none", key_file)

    with cluster.keyserver_admin() as keyserver:
        fed_a = keyserver.create_federation(FederationCreate(name="matrix-a"))
        fed_b = keyserver.create_federation(FederationCreate(name="matrix-b"))
        victim_federation = keyserver.create_federation(FederationCreate(name="matrix-victim"))
    member, non_member, revoked = site("member", fed_a.id), site("non-member", fed_b.id), site("revoked", fed_a.id)
    victim_member = site("victim-member", fed_a.id)
    pending, rejected, victim_pending = registered("pending"), registered("rejected"), registered("victim-pending")
    job_spec = {"model": model_spec(2), "min_sites": 5, "round_deadline_s": 3600}
    with cluster.aggregator_admin() as operator:
        job = operator.create_job(job_create(fed_a.key_id, name="matrix", **job_spec))
        victim_job = operator.create_job(job_create(fed_a.key_id, name="matrix-victim", **job_spec))
        operator.reject_site(rejected.site_id)
        operator.revoke_site(revoked.site_id)
        operator.create_account(AccountCreate(name="matrix-viewer", role="viewer"))
        viewer_token = operator.issue_token("matrix-viewer", TokenCreate()).token
        operator.create_account(AccountCreate(name="matrix-target", role="viewer"))
        aggregator_target_token = operator.issue_token("matrix-target", TokenCreate()).info.id
    with cluster.keyserver_admin() as keyserver:
        keyserver.revoke_member(fed_a.id, revoked.site_id)
        keyserver.create_account(AccountCreate(name="matrix-target", role="viewer"))
        keyserver_target_token = keyserver.issue_token("matrix-target", TokenCreate()).info.id
    tokens: dict[str, str | None] = {
        "anonymous": None,
        "pending": None,
        "member": member.credential,
        "non_member": non_member.credential,
        "revoked": revoked.credential,
        "rejected": None,
        "viewer": viewer_token,
        "operator": cluster.secrets.aggregator_admin_token,
        "keyserver_admin": cluster.secrets.keyserver_admin_token,
        "service": cluster.secrets.aggregator_service_token_file.read_text(),
        "garbage": "fht_" + secrets.token_urlsafe(32),
    }
    signers = {"member": member, "non_member": non_member, "revoked": revoked, "pending": pending, "rejected": rejected}
    common = {
        "federation_id": fed_a.id,
        "key_id": fed_a.key_id,
        "job_id": job.id,
        "number": "0",
        "name": "matrix-target",
        "sha256": "a" * 64,
    }
    params = {
        "aggregator": common | {"site_id": victim_pending.site_id, "token_id": aggregator_target_token},
        "keyserver": common | {"site_id": victim_member.site_id, "token_id": keyserver_target_token},
        "victims": {
            "job_id": victim_job.id,
            "federation_id": victim_federation.id,
            "candidate_key": victim_member.public_key,
        },
    }
    return World(cluster, tokens, signers, params)


def _signed_body(world: World, actor: str, purpose: str, params: dict[str, str]) -> dict[str, object]:
    if actor in world.signers:
        signer = world.signers[actor]
        site_id, key = signer.site_id, private_key_from_pem(Path(signer.signing_key_file).read_bytes())
    else:
        site_id, key = world.signers["member"].site_id, generate_signing_key()  # no site key: pose as the member
    if purpose in (KEY_RELEASE_PURPOSE, PINNED_KEYS_PURPOSE):
        fields = [params["key_id"]]
    else:
        fields = [params["federation_id"], params["site_id"], world.params["victims"]["candidate_key"]]
    ts, nonce, signature = sign_request(key, purpose, world.cluster.keyserver_url, fields)
    return {"site_id": site_id, "timestamp": ts, "nonce": nonce, "signature": signature}


def _request(world: World, service: str, method: str, path: str, actor: str) -> httpx.Response:
    base = world.cluster.aggregator_url if service == "aggregator" else world.cluster.keyserver_url
    params = dict(world.params[service])
    if path.endswith(("/stop", "/rotate")):
        params |= {k: world.params["victims"][k] for k in ("job_id", "federation_id")}
    url = base + path.format(**params)
    headers = {}
    token = world.tokens[actor]
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    kwargs: dict[str, Any] = {"headers": headers}
    if path in SIGNED_ROUTES:
        kwargs["json"] = _signed_body(world, actor, SIGNED_ROUTES[path], params)
    elif path.endswith("/updates"):
        kwargs["content"] = b"not an envelope"
    elif method == "POST" and path != "/v1/sites":
        kwargs["json"] = {"deliberately": "invalid"}
    elif path == "/v1/sites":
        kwargs["json"] = {"name": "matrix-registration"}
    verify = world.cluster.secrets.tls.ssl_context()
    if path == "/v1/events":
        with httpx.stream(method, url, timeout=10, verify=verify, **kwargs) as response:
            if response.status_code != 200:
                response.read()
            return response
    return httpx.request(method, url, timeout=30, verify=verify, **kwargs)


CELLS: list[tuple[str, str, str, str]] = [
    (service, method, path, actor)
    for service, rules in (("aggregator", AGGREGATOR_RULES), ("keyserver", KEYSERVER_RULES))
    for (method, path) in rules
    for actor in ACTORS
]


def test_every_route_has_a_rule(cluster: Cluster) -> None:
    verify = cluster.secrets.tls.ssl_context()
    assert _operation_routes(cluster.aggregator_url, verify) == set(AGGREGATOR_RULES)
    assert _operation_routes(cluster.keyserver_url, verify) == set(KEYSERVER_RULES)
    assert len(CELLS) == (len(AGGREGATOR_RULES) + len(KEYSERVER_RULES)) * len(ACTORS)


@pytest.mark.parametrize(("service", "method", "path", "actor"), CELLS, ids=[" ".join(c) for c in CELLS])
def test_cell(world: World, service: str, method: str, path: str, actor: str) -> None:
    rules = AGGREGATOR_RULES if service == "aggregator" else KEYSERVER_RULES
    expected = rules[(method, path)][actor]
    response = _request(world, service, method, path, actor)
    assert response.status_code < 500, response.text
    if expected == ALLOW:
        assert response.status_code not in (401, 403), f"{actor} was refused: {response.text}"
        if service == "aggregator" and path.startswith("/v1/jobs/{job_id}") and actor in SITES:
            assert response.status_code != 404, f"{actor} could not see its own federation's job"
    else:
        assert response.status_code == expected, response.text
        assert response.json()["error"]["code"]
