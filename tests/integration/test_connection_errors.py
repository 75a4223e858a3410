"""A failure to reach a service says which failure it is and what to change, against the real
services over TLS: an untrusted certificate (another CA, no CA, the server's own certificate as
the CA), a host name the certificate does not name, a closed port, the other service's port, and
TLS files that are missing. Each is what a site admin sees from the ``fedhe`` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedhe.api_client import AggregatorClient
from fedhe.devca import create_ca
from fedhe.errors import UpstreamUnavailable
from fedhe.tls import ClientTLS, TLSSettingNames
from fedhe_demo.local_cluster import free_port
from tests.conftest import Cluster

EXIT_UNREACHABLE, EXIT_INVALID_INPUT = 3, 2


def _site_list(cluster: Cluster, aggregator_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``fedhe site list`` as the aggregator's admin, with ``env`` over the cluster's CLI settings."""
    return subprocess.run(
        [sys.executable, "-m", "fedhe.cli", "site", "list", "--aggregator", aggregator_url],
        env={**os.environ, **cluster.secrets.cli_env(), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_certificate_signed_by_another_ca_is_named_untrusted_with_the_ca_file_and_its_variable(
    cluster: Cluster, tmp_path: Path
) -> None:
    other = create_ca(tmp_path / "other", "another CA")
    result = _site_list(cluster, cluster.aggregator_url, FEDHE_CA_FILE=str(other.cert_file))
    assert result.returncode == EXIT_UNREACHABLE
    assert result.stderr.startswith(f"fedhe: tls_untrusted: GET {cluster.aggregator_url}/v1/sites failed: ")
    assert f"the CA in FEDHE_CA_FILE={other.cert_file} did not sign it" in result.stderr
    assert "ConnectError" not in result.stderr


def test_no_ca_and_the_servers_own_certificate_as_ca_each_say_what_to_set(cluster: Cluster) -> None:
    names = TLSSettingNames(ca_file="FEDHE_CA_FILE")
    system_cas = AggregatorClient(cluster.aggregator_url, tls=ClientTLS(names=names))
    with system_cas, pytest.raises(UpstreamUnavailable) as caught:
        system_cas.sites()
    assert caught.value.code == "tls_untrusted"
    assert "FEDHE_CA_FILE is not set, so only the system's CAs are trusted" in caught.value.message
    result = _site_list(cluster, cluster.aggregator_url, FEDHE_CA_FILE=str(cluster.secrets.server_cert_file))
    assert result.returncode == EXIT_UNREACHABLE
    assert "fedhe: tls_untrusted:" in result.stderr
    assert (
        f"FEDHE_CA_FILE={cluster.secrets.server_cert_file} holds a certificate that is not a CA "
        "(a server's own certificate?)"
    ) in result.stderr


def test_a_host_name_the_certificate_does_not_name_is_a_name_mismatch(cluster: Cluster) -> None:
    client = AggregatorClient(cluster.aggregator_url, tls=cluster.secrets.tls, url_setting="--aggregator")
    with client, pytest.raises(UpstreamUnavailable) as caught:
        # The TLS name the client checks, as if the URL had named this host (it resolves nowhere).
        client.request("GET", "/v1/sites", extensions={"sni_hostname": "aggregator.hospital.example"})
    assert caught.value.code == "tls_name_mismatch"
    assert "the server's certificate does not name 'aggregator.hospital.example'" in caught.value.message
    assert "use the host name its certificate was issued for in --aggregator" in caught.value.message


def test_a_closed_port_is_connection_refused_naming_the_url_setting(cluster: Cluster) -> None:
    closed = f"https://127.0.0.1:{free_port()}"
    result = _site_list(cluster, closed)
    assert result.returncode == EXIT_UNREACHABLE
    assert result.stderr == (
        f"fedhe: connection_refused: GET {closed}/v1/sites failed: nothing accepts connections on "
        f"{closed.removeprefix('https://')} (connection refused); is the aggregator running, and is "
        "--aggregator (or FEDHE_AGGREGATOR_URL) its address and port?\n"
    )


def test_the_keyservers_port_given_for_the_aggregator_is_named_as_such(cluster: Cluster) -> None:
    result = _site_list(cluster, cluster.keyserver_url)
    assert result.returncode == EXIT_UNREACHABLE
    assert result.stderr == (
        f"fedhe: wrong_service: GET {cluster.keyserver_url}/v1/sites: {cluster.keyserver_url} is the keyserver, "
        "not the aggregator; check --aggregator (or FEDHE_AGGREGATOR_URL)\n"
    )


def test_missing_tls_and_credential_files_name_the_file_and_the_variable(cluster: Cluster, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "ca.pem"
    result = _site_list(cluster, cluster.aggregator_url, FEDHE_CA_FILE=str(missing))
    assert (result.returncode, result.stderr) == (
        EXIT_INVALID_INPUT,
        f"fedhe: tls_file_missing: FEDHE_CA_FILE={missing}: no such file\n",
    )
    result = _site_list(cluster, cluster.aggregator_url, FEDHE_AGGREGATOR_TOKEN_FILE=str(missing))
    assert (result.returncode, result.stderr) == (
        EXIT_INVALID_INPUT,
        f"fedhe: file_missing: FEDHE_AGGREGATOR_TOKEN_FILE {missing}: no such file\n",
    )
