"""TLS in every mode (Secrets, cert-manager, plain HTTP) and mutual TLS; the mutual-TLS probe and
the helm-test pod's curl command are run for real against a local HTTPS server requiring client
certificates.

The Helm chart is rendered without a cluster; see helm_support.py for how and what this cannot show.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.deploy.helm_support import (
    AGGREGATOR_URL,
    KEYSERVER_URL,
    NAMESPACE,
    PREFIX,
    RELEASE,
    VARIANTS,
    by_kind,
    cert_manager,
    component,
    container,
    deployment,
    deployments,
    enabled,
    env_of,
    insecure,
    is_insecure,
    mounted_files,
    mutual,
    notes,
    plain_env,
    render,
    scenario_values,
    tls_secret,
    with_value,
    with_values,
)

# ---- TLS --------------------------------------------------------------------------------------


def test_services_serve_https_from_their_secret(tls_variant: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    values, objects = tls_variant
    for name in ("keyserver", "aggregator"):
        if not enabled(values, name):
            continue
        d = deployment(objects, name)
        c = container(d)
        env = plain_env(c)
        files = mounted_files(d["spec"]["template"]["spec"], c)
        prefix = PREFIX[name]
        assert files[env[f"{prefix}_TLS_CERT_FILE"]] == (tls_secret(values, name), "tls.crt")
        assert files[env[f"{prefix}_TLS_KEY_FILE"]] == (tls_secret(values, name), "tls.key")
        assert f"{prefix}_INSECURE_HTTP" not in env
        if name == "aggregator":
            ca = values["aggregator"].get("tls", {}).get("keyserverCa", {}).get("existingSecret")
            assert files[env["FEDHE_AGGREGATOR_TLS_CA_FILE"]] == (ca or tls_secret(values, name), "ca.crt")
        else:
            assert "FEDHE_KEYSERVER_TLS_CA_FILE" not in env  # it calls no other service
        if mutual(values, name):
            client_ca = values[name]["tls"]["mutual"].get("clientCa", {}).get("existingSecret")
            assert files[env[f"{prefix}_TLS_CLIENT_CA_FILE"]] == (client_ca or tls_secret(values, name), "ca.crt")
        else:
            assert f"{prefix}_TLS_CLIENT_CA_FILE" not in env
    for d in deployments(objects, "agent"):
        c = container(d)
        env = plain_env(c)
        files = mounted_files(d["spec"]["template"]["spec"], c)
        assert env["FEDHE_AGENT_TLS_CA_FILE"] in files
        assert env["FEDHE_AGENT_AGGREGATOR_URL"].startswith("https://")
        assert env["FEDHE_AGENT_KEYSERVER_URL"].startswith("https://")
        if mutual(values, "keyserver") or mutual(values, "aggregator"):
            assert files[env["FEDHE_AGENT_TLS_CLIENT_CERT_FILE"]][1] == "tls.crt"
            assert files[env["FEDHE_AGENT_TLS_CLIENT_KEY_FILE"]][1] == "tls.key"


def test_only_insecure_mode_sets_insecure_http(variant: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    values, objects = variant
    for d in by_kind(objects, "Deployment"):
        env = env_of(container(d))
        flags = [n for n in env if n.endswith("INSECURE_HTTP")]
        tls = [n for n in env if "_TLS_" in n]
        if is_insecure(values):
            assert flags == [f"{PREFIX[component(d)]}_INSECURE_HTTP"]
            assert env[flags[0]]["value"] == "true"
            assert tls == []
            assert "tls" not in {v["name"] for v in d["spec"]["template"]["spec"]["volumes"]}
        else:
            assert flags == []
            assert tls


def test_probes(variant: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    values, objects = variant
    for name, port in (("keyserver", 8090), ("aggregator", 8080)):
        if not enabled(values, name):
            continue
        c = container(deployment(objects, name))
        paths = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
        for probe, path in paths.items():
            if is_insecure(values):
                assert c[probe]["httpGet"] == {"path": path, "port": "http", "scheme": "HTTP"}
            elif mutual(values, name):
                command = c[probe]["exec"]["command"]
                assert command[:2] == ["python", "-c"]
                assert command[3:] == [
                    f"https://127.0.0.1:{port}{path}",
                    "/etc/fedhe/tls/tls.crt",
                    "/etc/fedhe/tls/tls.key",
                    str(c[probe]["timeoutSeconds"]),
                ]
            else:
                assert c[probe]["httpGet"] == {"path": path, "port": "https", "scheme": "HTTPS"}


def test_connection_test_verifies_each_service(variant: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    values, objects = variant
    pods = by_kind(objects, "Pod")
    if not values.get("tests", {}).get("enabled", True):
        assert pods == []
        return
    [pod] = pods
    [c] = pod["spec"]["containers"]
    env = env_of(c)
    script = c["args"][0]
    assert "--insecure" not in script
    assert " -k " not in script
    scheme = "http" if is_insecure(values) else "https"
    for name, url in (("keyserver", KEYSERVER_URL), ("aggregator", AGGREGATOR_URL)):
        var = f"{name.upper()}_URL"
        if not enabled(values, name):
            assert var not in env
            continue
        port = values.get(name, {}).get("service", {}).get("port", int(url.rsplit(":", 1)[1]))
        assert env[var]["value"] == f"{scheme}://{RELEASE}-fedhe-{name}:{port}"
        [line] = [line for line in script.splitlines() if f'"${var}/healthz"' in line and "curl" in line]
        assert (f"--cacert /etc/fedhe/tls/{name}-ca.crt" in line) != is_insecure(values)
        assert ("--cert /etc/fedhe/client/tls.crt" in line) == mutual(values, name)
    if not is_insecure(values):
        files = mounted_files(pod["spec"], c)
        for name in ("keyserver", "aggregator"):
            if enabled(values, name):
                assert files[f"/etc/fedhe/tls/{name}-ca.crt"] == (tls_secret(values, name), "ca.crt")
        # Only CAs and a client certificate: never a service's private key.
        assert {key for _, key in files.values()} <= {"ca.crt", "tls.crt", "tls.key"}
        assert not any(
            key == "tls.key" and s == tls_secret(values, n)
            for s, key in files.values()
            for n in ("keyserver", "aggregator")
            if enabled(values, n)
        )


def test_cert_manager_objects_only_when_enabled(variant: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    values, objects = variant
    certificates = by_kind(objects, "Certificate")
    if not values.get("tls", {}).get("certManager", {}).get("enabled"):
        assert certificates == []
        assert "cert-manager.io" not in yaml.safe_dump_all(objects)
        return
    by_name = {c["metadata"]["name"]: c for c in certificates}
    for name in ("keyserver", "aggregator"):
        if not enabled(values, name):
            assert f"{RELEASE}-fedhe-{name}" not in by_name
            continue
        cert = by_name[f"{RELEASE}-fedhe-{name}"]["spec"]
        assert cert["secretName"] == f"{RELEASE}-fedhe-{name}-tls"
        assert cert["issuerRef"]["name"] == values["tls"]["certManager"]["issuerRef"]["name"]
        # Server auth, and client auth for calling the keyserver and for the in-pod probes.
        assert {"server auth", "client auth"} <= set(cert["usages"])
        service = f"{RELEASE}-fedhe-{name}"
        assert {service, f"{service}.{NAMESPACE}.svc", f"{service}.{NAMESPACE}.svc.cluster.local"} <= set(
            cert["dnsNames"]
        )
        assert set(values[name].get("tls", {}).get("extraDnsNames", [])) <= set(cert["dnsNames"])
    client_certs = [c for n, c in by_name.items() if n.endswith("-client-tls")]
    needs_clients = (enabled(values, "keyserver") and mutual(values, "keyserver")) or (
        enabled(values, "aggregator") and mutual(values, "aggregator")
    )
    if not needs_clients:
        assert client_certs == []
    for cert in client_certs:
        assert cert["spec"]["usages"][-1] == "client auth"
        assert "server auth" not in cert["spec"]["usages"]
        assert "dnsNames" not in cert["spec"]


def test_cert_manager_issues_client_certificates_under_mutual_tls(chart: helm.Chart) -> None:
    values = cert_manager(scenario_values("with-agents-values.yaml"))
    for agent in values["agents"]:
        agent.pop("tls")
    values["tests"].pop("clientCertSecret")
    objects = render(chart, values)
    names = {c["metadata"]["name"] for c in by_kind(objects, "Certificate")}
    assert names == {
        f"{RELEASE}-fedhe-keyserver",
        f"{RELEASE}-fedhe-aggregator",
        f"{RELEASE}-fedhe-agent-site-a-client-tls",
        f"{RELEASE}-fedhe-agent-site-b-client-tls",
        f"{RELEASE}-fedhe-test-client-tls",
    }
    for d in deployments(objects, "agent"):
        files = mounted_files(d["spec"]["template"]["spec"], container(d))
        site = d["metadata"]["labels"]["fedhe.io/site"]
        assert files["/etc/fedhe/tls/tls.crt"] == (f"{RELEASE}-fedhe-agent-{site}-client-tls", "tls.crt")
    [pod] = by_kind(objects, "Pod")
    assert mounted_files(pod["spec"], pod["spec"]["containers"][0])["/etc/fedhe/client/tls.key"] == (
        f"{RELEASE}-fedhe-test-client-tls",
        "tls.key",
    )


def test_public_url_must_be_on_the_certificate(chart: helm.Chart) -> None:
    values = with_value(
        cert_manager(scenario_values("minimal-values.yaml")), "keyserver.publicUrl", "https://keys.example.org"
    )
    with pytest.raises(helm.HelmRenderError, match=r"keyserver\.tls\.extraDnsNames"):
        render(chart, values)
    values = with_value(values, "keyserver.tls.extraDnsNames", ["keys.example.org"])
    assert by_kind(render(chart, values), "Certificate")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"keyserver.tls.existingSecret": ""}, r"keyserver\.tls\.existingSecret is required: TLS is on by default"),
        ({"aggregator.tls.existingSecret": ""}, r"aggregator\.tls\.existingSecret is required"),
        ({"tls.insecureHttp": True}, r"tls\.insecureHttp is true but keyserver\.tls\.existingSecret is set"),
        (
            {"tls.certManager.enabled": True, "tls.certManager.issuerRef.name": "ca"},
            r"keyserver\.tls\.existingSecret is set while tls\.certManager\.enabled",
        ),
        (
            {"tls.certManager.enabled": True, "keyserver.tls.existingSecret": "", "aggregator.tls.existingSecret": ""},
            r"tls\.certManager\.issuerRef\.name is required",
        ),
        ({"aggregator.keyserverUrl": "http://keys.example.org"}, r"aggregator\.keyserverUrl is http://.*TLS is on"),
        ({"keyserver.publicUrl": "http://keys.example.org"}, r"keyserver\.publicUrl is http://"),
    ],
)
def test_tls_mistakes_fail_with_a_message(chart: helm.Chart, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError, match=message):
        render(chart, with_values(scenario_values("minimal-values.yaml"), changes))


def test_insecure_mode_refuses_tls_options(chart: helm.Chart) -> None:
    base = insecure(scenario_values("minimal-values.yaml"))
    with pytest.raises(helm.HelmRenderError, match=r"tls\.insecureHttp and tls\.certManager\.enabled are both true"):
        render(chart, with_values(base, {"tls.certManager.enabled": True, "tls.certManager.issuerRef.name": "ca"}))
    with pytest.raises(helm.HelmRenderError, match=r"keyserver\.tls\.mutual\.enabled needs TLS"):
        render(chart, with_value(base, "keyserver.tls.mutual.enabled", True))


def test_insecure_mode_warns_in_notes_and_nothing_else_does(chart: helm.Chart) -> None:
    for name, values in VARIANTS:
        text = notes(chart, values)
        assert ("WARNING: PLAIN HTTP" in text) == is_insecure(values), name


def test_notes_show_the_new_cli_settings(chart: helm.Chart) -> None:
    text = notes(chart, scenario_values("minimal-values.yaml"))
    for setting in ("FEDHE_KEYSERVER_TOKEN_FILE", "FEDHE_AGGREGATOR_TOKEN_FILE", "FEDHE_CA_FILE"):
        assert setting in text
    assert "get secret fedhe-keyserver-admin" in text
    assert "get secret fedhe-aggregator-admin" in text
    assert f"Keyserver public URL (the audience of signed key-release requests): {KEYSERVER_URL}" in text
    coordinator = notes(chart, scenario_values("production-coordinator-values.yaml"))
    assert "FEDHE_KEYSERVER_TOKEN_FILE" not in coordinator  # the coordinator holds no keyserver admin token


# ---- mutual TLS -------------------------------------------------------------------------------


def test_mutual_tls_needs_client_certificates_for_agents_and_the_test_pod(chart: helm.Chart) -> None:
    values = scenario_values("with-agents-values.yaml")
    del values["agents"][0]["tls"]
    with pytest.raises(helm.HelmRenderError, match=r"agents\[0\]\.tls\.clientCertSecret is required \(site site-a\)"):
        render(chart, values)
    values = scenario_values("with-agents-values.yaml")
    del values["tests"]["clientCertSecret"]
    with pytest.raises(helm.HelmRenderError, match=r"tests\.clientCertSecret is required"):
        render(chart, values)
    assert by_kind(render(chart, with_value(values, "tests.enabled", False)), "Pod") == []


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    directory: Path,
    name: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    usages: list[x509.ObjectIdentifier],
) -> tuple[Path, Path]:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(_key_pem(key))
    return cert_file, key_file


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a service certificate allowing server and client auth, a server-only one, a client one."""
    directory = tmp_path_factory.mktemp("pki")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = datetime.datetime.now(datetime.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    ca = (ca_cert, key)
    both = _issue(directory, "service", ca, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    server_only = _issue(directory, "server-only", ca, [ExtendedKeyUsageOID.SERVER_AUTH])
    client = _issue(directory, "client", ca, [ExtendedKeyUsageOID.CLIENT_AUTH])
    return {
        "ca": directory / "ca.crt",
        "cert": both[0],
        "key": both[1],
        "server_only_cert": server_only[0],
        "server_only_key": server_only[1],
        "client_cert": client[0],
        "client_key": client[1],
    }


@pytest.fixture
def mtls_server(pki: dict[str, Path]) -> Iterator[tuple[int, dict[str, int]]]:
    """HTTPS on 127.0.0.1 requiring client certificates, as uvicorn serves with a client CA."""
    status = {"/healthz": 200, "/readyz": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = status.get(self.path, 404)
            body = b'{"status":"ok"}'
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["cert"], pki["key"])
    context.load_verify_locations(pki["ca"])
    context.verify_mode = ssl.CERT_REQUIRED
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], status
    finally:
        server.shutdown()
        server.server_close()


def _run_probe(command: list[str], port: int, path: str, cert: Path, key: Path) -> int:
    url = re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", command[3])
    assert url.endswith(path)
    argv = [sys.executable, *command[1:3], url, str(cert), str(key), command[6]]
    return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode


def test_mutual_tls_probe_works_against_a_server_requiring_client_certificates(
    chart: helm.Chart, pki: dict[str, Path], mtls_server: tuple[int, dict[str, int]]
) -> None:
    """The exec probe the chart renders under mutual TLS, run as the kubelet would run it."""
    port, status = mtls_server
    objects = render(chart, scenario_values("with-agents-values.yaml"))
    c = container(deployment(objects, "keyserver"))
    liveness, readiness = c["livenessProbe"]["exec"]["command"], c["readinessProbe"]["exec"]["command"]
    assert _run_probe(liveness, port, "/healthz", pki["cert"], pki["key"]) == 0
    assert _run_probe(readiness, port, "/readyz", pki["cert"], pki["key"]) == 0
    status["/readyz"] = 503  # database down: not ready
    assert _run_probe(readiness, port, "/readyz", pki["cert"], pki["key"]) != 0
    # A serverAuth-only certificate is refused as a client certificate: hence the requirement
    # (README.md) that service certificates allow client authentication under mutual TLS.
    assert _run_probe(liveness, port, "/healthz", pki["server_only_cert"], pki["server_only_key"]) != 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_helm_test_script_works_against_a_server_requiring_client_certificates(
    chart: helm.Chart, pki: dict[str, Path], mtls_server: tuple[int, dict[str, int]], tmp_path: Path
) -> None:
    port, _ = mtls_server
    [pod] = by_kind(render(chart, scenario_values("production-keyserver-values.yaml")), "Pod")
    script = pod["spec"]["containers"][0]["args"][0]
    (tmp_path / "tls").mkdir()
    (tmp_path / "client").mkdir()
    shutil.copy(pki["ca"], tmp_path / "tls" / "keyserver-ca.crt")
    shutil.copy(pki["client_cert"], tmp_path / "client" / "tls.crt")
    shutil.copy(pki["client_key"], tmp_path / "client" / "tls.key")
    local = script.replace("/etc/fedhe/tls/", f"{tmp_path}/tls/").replace("/etc/fedhe/client/", f"{tmp_path}/client/")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KEYSERVER_URL": f"https://localhost:{port}"}
    done = subprocess.run(["sh", "-c", local], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert '{"status":"ok"}' in done.stdout
    # Without the client certificate the same request fails: the server really requires one.
    bare = local.replace(f" --cert {tmp_path}/client/tls.crt --key {tmp_path}/client/tls.key", "")
    done = subprocess.run(["sh", "-c", bare], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode != 0
