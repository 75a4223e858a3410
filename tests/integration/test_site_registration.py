"""Registration over REST on the real aggregator (TLS, Postgres): a second registration of a
pending or approved site is refused naming that site, and a body not sent as JSON is refused
saying which header to send."""

from __future__ import annotations

import json
from typing import Any

import httpx
from sqlalchemy import text

from fedhe.auth import generate_signing_key, public_key_b64
from tests.conftest import Cluster
from tests.integration.helpers import database_connection


def _registration(name: str) -> dict[str, str]:
    return {
        "name": name,
        "organisation": f"{name} NHS Trust",
        "contact": "fl-admin@hospital.example",
        "public_key": public_key_b64(generate_signing_key()),
    }


def _post(cluster: Cluster, **kwargs: Any) -> httpx.Response:
    with httpx.Client(verify=cluster.secrets.tls.ssl_context(), timeout=30) as http:
        return http.post(f"{cluster.aggregator_url}/v1/sites", **kwargs)


def _sites_with_key(cluster: Cluster, public_key: str) -> list[tuple[str, str]]:
    with database_connection(cluster.aggregator_database_url) as conn:
        rows = conn.execute(
            text("SELECT id, status FROM sites WHERE public_key = :key ORDER BY created_at"), {"key": public_key}
        ).all()
    return [(row.id, row.status) for row in rows]


def test_registering_an_approved_site_again_is_refused_naming_it(cluster: Cluster) -> None:
    registration = _registration("Hospital R")
    first = _post(cluster, json=registration)
    assert first.status_code == 201
    site_id = first.json()["id"]
    with cluster.aggregator_admin() as operator:
        operator.approve_site(site_id)

    again = _post(cluster, json=registration)

    assert again.status_code == 409
    error = again.json()["error"]
    assert error["code"] == "site_already_registered"
    assert error["detail"] == {"site_id": site_id, "status": "approved"}
    assert error["message"] == (
        f"'Hospital R' is already registered with this public key as {site_id} (approved): use that site id "
        "with the credential issued at its approval; if the credential is lost, ask the aggregator admin to "
        f"revoke {site_id} and register again with a new signing key"
    )
    assert _sites_with_key(cluster, registration["public_key"]) == [(site_id, "approved")]


def test_registering_a_pending_site_again_is_refused_and_after_a_rejection_it_is_new(cluster: Cluster) -> None:
    registration = _registration("Hospital P")
    site_id = _post(cluster, json=registration).json()["id"]
    # Another organisation or contact does not make it another site: name and key do.
    again = _post(cluster, json=registration | {"contact": "someone-else@hospital.example"})
    assert again.status_code == 409
    error = again.json()["error"]
    assert error["detail"] == {"site_id": site_id, "status": "pending"}
    assert error["message"].endswith(
        "(pending): it awaits an operator's decision: send that site id to your operators instead of registering again"
    )
    assert _sites_with_key(cluster, registration["public_key"]) == [(site_id, "pending")]

    with cluster.aggregator_admin() as operator:
        operator.reject_site(site_id)
    anew = _post(cluster, json=registration)
    assert anew.status_code == 201
    assert _sites_with_key(cluster, registration["public_key"]) == [
        (site_id, "rejected"),
        (anew.json()["id"], "pending"),
    ]


def test_a_registration_not_sent_as_json_says_which_header_to_send(cluster: Cluster) -> None:
    registration = _registration("Hospital J")
    body = json.dumps(registration).encode()
    # httpx adds no Content-Type to raw content; curl's --data sends a form's.
    for headers, sent in (
        ({}, "no Content-Type"),
        ({"Content-Type": "application/x-www-form-urlencoded"}, "Content-Type: application/x-www-form-urlencoded"),
    ):
        refused = _post(cluster, content=body, headers=headers)
        assert refused.status_code == 400
        assert refused.json() == {
            "error": {
                "code": "unsupported_media_type",
                "message": "the body must be JSON sent with the header Content-Type: application/json; "
                f"this request had {sent} (with curl, add -H 'Content-Type: application/json')",
            }
        }
    assert _sites_with_key(cluster, registration["public_key"]) == []
    charset = _post(cluster, content=body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert charset.status_code == 201
