"""Every HTTPS answer of both services carries HSTS and the security headers: JSON, errors, dashboard.

The shared cluster runs with the default ``HSTS_MAX_AGE_S`` (one year); tests/integration/test_limits.py
checks another value and 0 (no header).
"""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Cluster

HSTS = "max-age=31536000; includeSubDomains"
COMMON = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}


def _get(cluster: Cluster, url: str, **kwargs: object) -> httpx.Response:
    return httpx.get(url, verify=cluster.secrets.tls.ssl_context(), timeout=30, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("service", "path", "status"),
    [
        ("aggregator", "/healthz", 200),
        ("aggregator", "/v1/jobs", 401),
        ("aggregator", "/v1/no-such-route", 404),
        ("keyserver", "/healthz", 200),
        ("keyserver", "/v1/federations", 401),
        ("keyserver", "/v1/no-such-route", 404),
    ],
)
def test_json_answers_and_errors_carry_hsts_and_the_security_headers(
    cluster: Cluster, service: str, path: str, status: int
) -> None:
    base = cluster.aggregator_url if service == "aggregator" else cluster.keyserver_url
    response = _get(cluster, base + path)
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Strict-Transport-Security"] == HSTS
    assert {name: response.headers.get(name) for name in COMMON} == COMMON
    assert response.headers["Cache-Control"] == "no-store"


def test_json_answers_of_authenticated_calls_are_not_stored(cluster: Cluster) -> None:
    token = cluster.secrets.aggregator_admin_token
    response = _get(cluster, f"{cluster.aggregator_url}/v1/sites", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Strict-Transport-Security"] == HSTS


@pytest.mark.parametrize("path", ["/dashboard", "/dashboard/assets/vendor/uplot-1.6.32/uPlot.esm.js"])
def test_the_dashboard_carries_hsts_its_csp_and_may_not_be_framed(cluster: Cluster, path: str) -> None:
    response = _get(cluster, cluster.aggregator_url + path)
    assert response.status_code == 200
    assert response.headers["Strict-Transport-Security"] == HSTS
    assert {name: response.headers.get(name) for name in COMMON} == COMMON
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert response.headers["Cache-Control"] == "no-cache", "the dashboard keeps its own cache policy"
    assert response.headers.get_list("X-Frame-Options") == ["DENY"], "set once, not twice"
