"""TLS everywhere, on by default: refused without certificates, plain HTTP only when asked for, mutual TLS."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from fedhe.api_client import AggregatorClient, KeyserverClient
from fedhe.devca import DevCA
from fedhe.errors import InvalidRequest, UpstreamUnavailable
from fedhe.schemas import FederationCreate
from fedhe.tls import ClientTLS
from fedhe_demo.local_cluster import ClusterSecrets, ManagedProcess, free_port, start_aggregator, start_keyserver, url
from tests.conftest import Cluster, PostgresDatabases
from tests.factories import job_create, model_spec


def _fedhe(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedhe.cli", *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_clients_refuse_plain_http_unless_told_otherwise(cluster: Cluster) -> None:
    with pytest.raises(InvalidRequest) as refused:
        AggregatorClient(cluster.aggregator_url.replace("https://", "http://"))
    assert refused.value.code == "insecure_url"
    plain = AggregatorClient(cluster.aggregator_url.replace("https://", "http://"), tls=ClientTLS(insecure_http=True))
    with plain, pytest.raises(UpstreamUnavailable):
        plain.whoami()  # an HTTPS port does not speak plain HTTP


def test_a_client_that_does_not_trust_the_ca_cannot_connect(cluster: Cluster) -> None:
    with AggregatorClient(cluster.aggregator_url) as untrusting, pytest.raises(UpstreamUnavailable):
        untrusting.sites()


def test_a_service_without_certificates_refuses_to_start(tmp_path: Path, postgres: PostgresDatabases) -> None:
    secrets = ClusterSecrets.generate(tmp_path / "secrets")
    env = {
        "PATH": "/usr/bin:/bin",
        "FEDHE_KEYSERVER_DATABASE_URL": f"sqlite:///{tmp_path}/ks.db",
        "FEDHE_KEYSERVER_KEK_FILE": str(secrets.kek_file),
    }
    result = _fedhe("keyserver", "--port", str(free_port()), env=env)
    assert result.returncode == 2
    assert "TLS is on by default" in result.stderr


def test_plain_http_needs_the_flag_and_says_so_loudly(tmp_path: Path) -> None:
    secrets = ClusterSecrets.generate(tmp_path / "secrets")
    port = free_port()
    process = ManagedProcess(
        "plain-keyserver",
        ["keyserver", "--port", str(port)],
        {
            "FEDHE_KEYSERVER_DATABASE_URL": f"sqlite:///{tmp_path}/ks.db",
            "FEDHE_KEYSERVER_KEK_FILE": str(secrets.kek_file),
            "FEDHE_KEYSERVER_INSECURE_HTTP": "true",
        },
        tmp_path / "logs",
    )
    try:
        process.wait_healthy(f"http://127.0.0.1:{port}", ClientTLS(insecure_http=True))
        assert "PLAIN HTTP" in process.tail()
    finally:
        process.stop()


def test_mutual_tls_admits_only_clients_with_a_certificate_of_the_ca(
    tmp_path: Path, postgres: PostgresDatabases
) -> None:
    secrets = ClusterSecrets.generate(tmp_path / "secrets")
    ca = DevCA(secrets.ca_file, secrets.directory / "ca-key.pem")
    site_cert = ca.issue(secrets.directory, "site-client", client=True)
    ks_port, ag_port = free_port(), free_port()
    mutual = {"FEDHE_KEYSERVER_TLS_CLIENT_CA_FILE": str(secrets.ca_file)}
    keyserver = start_keyserver(
        port=ks_port,
        database_url=postgres.create("fedhe_mtls_ks"),
        secrets=secrets,
        log_dir=tmp_path / "logs",
        extra_env=mutual,
        health_tls=ClientTLS(ca_file=secrets.ca_file, cert_file=site_cert.cert_file, key_file=site_cert.key_file),
    )
    aggregator = start_aggregator(
        port=ag_port,
        database_url=postgres.create("fedhe_mtls_ag"),
        keyserver_url=url(ks_port),
        secrets=secrets,
        log_dir=tmp_path / "logs",
    )
    try:
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url(ks_port)}/healthz", verify=secrets.tls.ssl_context(), timeout=5)
        with_cert = ClientTLS(ca_file=secrets.ca_file, cert_file=site_cert.cert_file, key_file=site_cert.key_file)
        assert httpx.get(f"{url(ks_port)}/healthz", verify=with_cert.ssl_context(), timeout=5).status_code == 200
        admin = KeyserverClient(url(ks_port), secrets.keyserver_admin_token, tls=with_cert)
        with admin:
            federation = admin.create_federation(FederationCreate(name="mutual"))
        # The aggregator presents its own certificate to the keyserver: creating a job fetches the context.
        with secrets.aggregator_admin(url(ag_port)) as operator:
            job = operator.create_job(job_create(federation.key_id, name="mtls", model=model_spec(2)))
        assert job.federation_id == federation.id
        check = _fedhe(
            "keyserver",
            "check",
            "--port",
            str(ks_port),
            env={
                "PATH": "/usr/bin:/bin",
                "FEDHE_KEYSERVER_TLS_CERT_FILE": str(secrets.server_cert_file),
                "FEDHE_KEYSERVER_TLS_KEY_FILE": str(secrets.server_key_file),
            },
        )
        assert check.returncode == 0, check.stderr
    finally:
        aggregator.stop()
        keyserver.stop()
