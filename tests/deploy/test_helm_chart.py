"""The Helm chart in deploy/helm/fedhe, checked without a cluster.

No Kubernetes cluster runs here (and there is no helm binary), so the chart is rendered and
schema-validated, not installed. helm-python-sdk renders and lints it with Helm's own Go
engine (the libhelm_c shared library shipped inside its wheel, loaded in-process through
ctypes; nothing is downloaded at run time). Every rendered manifest is then validated with
kubernetes-validate against the OpenAPI schemas of Kubernetes 1.30, in strict mode (unknown
fields are errors); cert-manager Certificates and Prometheus-operator ServiceMonitors, which
kubernetes-validate does not know, are checked against strict subsets of their v1 schemas written
out below. Each scenario file in deploy/helm/fedhe/ci/ is rendered, plus variations for every TLS
mode (Secrets, cert-manager, plain HTTP), mutual TLS, split installs and monitoring. The
environment the chart gives each container is loaded into the services' own settings classes, so
a misspelt or removed setting, a value out of range or an audience the agents and the keyserver
disagree on fails here.

The probe that replaces the kubelet's under mutual TLS, and the helm-test pod's curl command,
are run for real against a local HTTPS server that requires client certificates.

The Grafana dashboard's PromQL is checked against the metrics the services' own registries
export: a misspelt or removed metric or label fails here, not on an operator's empty panel.

What this cannot show: that the images exist and start, that the Secrets named in the values
exist with the right keys, that cert-manager issues what is asked, that the cluster's CNI
enforces the NetworkPolicies, or that Prometheus and Grafana load what the chart gives them.
"""

from __future__ import annotations

import copy
import datetime
import ipaddress
import json
import os
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
import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic_settings import BaseSettings

from aggregator.metrics import Metrics
from aggregator.settings import AggregatorSettings
from client_agent.settings import AgentSettings
from keyserver.metrics import KeyserverMetrics
from keyserver.settings import KeyserverSettings

pytestmark = pytest.mark.deploy

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "deploy" / "helm" / "fedhe"
SCENARIOS = sorted(p.name for p in (CHART_DIR / "ci").glob("*-values.yaml"))
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "demo", "fedhe"
KEYSERVER_URL = f"https://{RELEASE}-fedhe-keyserver:8090"
AGGREGATOR_URL = f"https://{RELEASE}-fedhe-aggregator:8080"

KEYSERVER_ENV = {
    "FEDHE_KEYSERVER_HOST",
    "FEDHE_KEYSERVER_PORT",
    "FEDHE_KEYSERVER_PUBLIC_URL",
    "FEDHE_KEYSERVER_DATABASE_URL",
    "FEDHE_KEYSERVER_KEK_FILE",
    "FEDHE_KEYSERVER_BOOTSTRAP_ADMIN",
    "FEDHE_KEYSERVER_BOOTSTRAP_ADMIN_TOKEN_FILE",
    "FEDHE_KEYSERVER_KEY_RELEASE_MAX_SKEW_S",
    "FEDHE_KEYSERVER_KEY_RELEASES_PER_SITE",
    "FEDHE_KEYSERVER_MAX_BODY_BYTES",
    "FEDHE_KEYSERVER_RATE_LIMIT_PER_ADDRESS",
    "FEDHE_KEYSERVER_RATE_LIMIT_PER_CREDENTIAL",
    "FEDHE_KEYSERVER_AUTH_FAILURES_PER_ADDRESS",
    "FEDHE_KEYSERVER_LOG_LEVEL",
}  # plus AGGREGATOR_TOKEN_FILE when the aggregator's token is given, REDIS_URL with Redis, and TLS
AGGREGATOR_ENV = {
    "FEDHE_AGGREGATOR_HOST",
    "FEDHE_AGGREGATOR_PORT",
    "FEDHE_AGGREGATOR_DATABASE_URL",
    "FEDHE_AGGREGATOR_KEYSERVER_URL",
    "FEDHE_AGGREGATOR_KEYSERVER_TOKEN_FILE",
    "FEDHE_AGGREGATOR_BOOTSTRAP_ADMIN",
    "FEDHE_AGGREGATOR_BOOTSTRAP_ADMIN_TOKEN_FILE",
    "FEDHE_AGGREGATOR_MEMBERSHIP_CACHE_S",
    "FEDHE_AGGREGATOR_MAX_BODY_BYTES",
    "FEDHE_AGGREGATOR_MAX_UPLOAD_BYTES",
    "FEDHE_AGGREGATOR_RATE_LIMIT_PER_ADDRESS",
    "FEDHE_AGGREGATOR_RATE_LIMIT_PER_CREDENTIAL",
    "FEDHE_AGGREGATOR_AUTH_FAILURES_PER_ADDRESS",
    "FEDHE_AGGREGATOR_REGISTRATIONS_PER_ADDRESS",
    "FEDHE_AGGREGATOR_LOG_LEVEL",
}  # plus REDIS_URL whenever Redis is configured, and TLS
AGENT_ENV = {
    "FEDHE_AGENT_AGGREGATOR_URL",
    "FEDHE_AGENT_KEYSERVER_URL",
    "FEDHE_AGENT_SITE_ID",
    "FEDHE_AGENT_CREDENTIAL_FILE",
    "FEDHE_AGENT_SIGNING_KEY_FILE",
    "FEDHE_AGENT_DATA_PATH",
    "FEDHE_AGENT_LABEL_COLUMN",
    "FEDHE_AGENT_STATE_DIR",
}  # plus FEDHE_AGENT_POLICY_FILE whenever the site has a policy, and TLS
PREFIX = {"keyserver": "FEDHE_KEYSERVER", "aggregator": "FEDHE_AGGREGATOR", "agent": "FEDHE_AGENT"}
SETTINGS: dict[str, type[BaseSettings]] = {
    "keyserver": KeyserverSettings,
    "aggregator": AggregatorSettings,
    "agent": AgentSettings,
}
# Settings the services dropped with the shared operator and service tokens.
REMOVED = re.compile(r"OPERATOR_TOKEN|SERVICE_TOKEN|KEYSERVER_AGGREGATOR_URL|operator-token|service-token")

# Names whose plain value would be a secret (the *_FILE variables only carry a path).
# RATE_LIMIT_PER_CREDENTIAL is a number, not a credential.
SECRET_NAME = re.compile(
    r"(TOKEN|SECRET|PASSWORD|PASSWD|KEK|(?<!_PER_)CREDENTIAL|SIGNING_KEY|PRIVATE_KEY|DATABASE_URL)$", re.I
)


_STRING_LIST = {"type": "array", "items": {"type": "string", "minLength": 1}}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def _custom_resource_schema(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A custom resource of ``kind`` with a name, labels and ``spec``, and nothing else."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {"name": {"type": "string", "maxLength": 63}, "labels": _STRING_MAP},
            },
            "spec": spec,
        },
    }


# A strict subset of cert-manager's Certificate (cert-manager.io/v1): the fields the chart
# uses, with the CRD's types and enums. kubernetes-validate knows only built-in kinds.
CERTIFICATE_SCHEMA = _custom_resource_schema(
    "cert-manager.io/v1",
    "Certificate",
    {
        "type": "object",
        "additionalProperties": False,
        "required": ["secretName", "issuerRef"],
        "properties": {
            "secretName": {"type": "string", "minLength": 1, "maxLength": 253},
            "secretTemplate": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"labels": _STRING_MAP, "annotations": _STRING_MAP},
            },
            "commonName": {"type": "string", "maxLength": 64},
            "dnsNames": _STRING_LIST,
            "duration": {"type": "string"},
            "renewBefore": {"type": "string"},
            "privateKey": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                    "encoding": {"enum": ["PKCS1", "PKCS8"]},
                    "rotationPolicy": {"enum": ["Never", "Always"]},
                    "size": {"type": "integer"},
                },
            },
            "issuerRef": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "kind": {"type": "string"},
                    "group": {"type": "string"},
                },
            },
            "usages": {
                "type": "array",
                "items": {
                    "enum": ["digital signature", "key encipherment", "server auth", "client auth"],
                },
            },
        },
    },
)


# A strict subset of the Prometheus operator's ServiceMonitor (monitoring.coreos.com/v1): the
# fields the chart uses, with the CRD's types, enums and duration pattern.
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_SECRET_KEY = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "key"],
    "properties": {"name": {"type": "string", "minLength": 1}, "key": {"type": "string", "minLength": 1}},
}
SERVICE_MONITOR_SCHEMA = _custom_resource_schema(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    {
        "type": "object",
        "additionalProperties": False,
        "required": ["selector", "endpoints"],
        "properties": {
            "selector": {
                "type": "object",
                "additionalProperties": False,
                "required": ["matchLabels"],
                "properties": {"matchLabels": _STRING_MAP},
            },
            "podTargetLabels": _STRING_LIST,
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["port", "scheme", "path"],
                    "properties": {
                        "port": {"type": "string", "minLength": 1},
                        "scheme": {"enum": ["http", "https"]},
                        "path": {"type": "string", "pattern": "^/"},
                        "interval": _DURATION,
                        "scrapeTimeout": _DURATION,
                        "tlsConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "serverName": {"type": "string", "minLength": 1},
                                "ca": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["secret"],
                                    "properties": {"secret": _SECRET_KEY},
                                },
                                "cert": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["secret"],
                                    "properties": {"secret": _SECRET_KEY},
                                },
                                "keySecret": _SECRET_KEY,
                            },
                        },
                    },
                },
            },
        },
    },
)


# ---- rendering helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def scenario_values(name: str) -> dict[str, Any]:
    values = yaml.safe_load((CHART_DIR / "ci" / name).read_text(encoding="utf-8"))
    assert isinstance(values, dict)
    return values


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every Kubernetes object the chart renders for these values (NOTES.txt left out)."""
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    objects: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def notes(chart: helm.Chart, values: dict[str, Any]) -> str:
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    [text] = [t for path, t in manifests.items() if path.endswith("NOTES.txt")]
    return text


def with_value(values: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of values with one dotted key set."""
    result = copy.deepcopy(values)
    node = result
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return result


def with_values(values: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    for dotted, value in changes.items():
        values = with_value(values, dotted, value)
    return values


def cert_manager(values: dict[str, Any]) -> dict[str, Any]:
    """These values with cert-manager issuing the certificates instead of the given Secrets."""
    result = with_values(values, {"tls.certManager.enabled": True, "tls.certManager.issuerRef.name": "fedhe-ca"})
    for name in ("keyserver", "aggregator"):
        result.get(name, {}).get("tls", {}).pop("existingSecret", None)
    return result


def insecure(values: dict[str, Any]) -> dict[str, Any]:
    """These values as a plain-HTTP trial."""
    result = with_value(values, "tls.insecureHttp", True)
    for name in ("keyserver", "aggregator"):
        result.get(name, {}).pop("tls", None)
    for agent in result.get("agents", []):
        agent.pop("tls", None)
    result.get("tests", {}).pop("clientCertSecret", None)
    return result


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def component(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["labels"]["app.kubernetes.io/component"])


def deployment(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    [found] = [d for d in by_kind(objects, "Deployment") if component(d) == name]
    return found


def deployments(objects: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [d for d in by_kind(objects, "Deployment") if component(d) == name]


def container(obj: dict[str, Any]) -> dict[str, Any]:
    [c] = obj["spec"]["template"]["spec"]["containers"]
    assert isinstance(c, dict)
    return c


def pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, PodSpec) of every workload, the helm-test Pod included."""
    specs = [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in by_kind(objects, "Deployment")]
    specs += [(o["metadata"]["name"], o["spec"]) for o in by_kind(objects, "Pod")]
    return specs


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def plain_env(c: dict[str, Any]) -> dict[str, str]:
    """The variables of a container that have a plain value (not valueFrom)."""
    return {e["name"]: str(e["value"]) for e in c.get("env", []) if "value" in e}


def secret_sources(volume: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(Secret name, key, file) of every file a secret or projected volume holds."""
    if "secret" in volume:
        name = volume["secret"]["secretName"]
        return [(name, i["key"], i["path"]) for i in volume["secret"]["items"]]
    found = []
    for source in volume.get("projected", {}).get("sources", []):
        if "secret" in source:
            found += [(source["secret"]["name"], i["key"], i["path"]) for i in source["secret"]["items"]]
    return found


def mounted_files(spec: dict[str, Any], c: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Absolute path -> (Secret, key) of every file a container sees from a read-only Secret volume."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    files = {}
    for mount in c.get("volumeMounts", []):
        for secret, key, path in secret_sources(volumes[mount["name"]]):
            assert mount.get("readOnly") is True, f"{mount['name']} holds Secret files but is writable"
            files[f"{mount['mountPath']}/{path}"] = (secret, key)
    return files


@pytest.fixture(scope="module", params=SCENARIOS)
def scenario(request: pytest.FixtureRequest, chart: helm.Chart) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    values = scenario_values(request.param)
    return values, render(chart, values)


# Every TLS mode and install shape, as (id, values); the scenario files plus variations.
def variants() -> list[tuple[str, dict[str, Any]]]:
    minimal = scenario_values("minimal-values.yaml")
    agents = scenario_values("with-agents-values.yaml")
    found = [(name, scenario_values(name)) for name in SCENARIOS]
    found += [
        ("minimal+cert-manager", cert_manager(minimal)),
        ("minimal+insecure", insecure(minimal)),
        ("agents+cert-manager", cert_manager(agents)),
        ("agents+insecure", insecure(agents)),
        (
            "minimal+mtls-keyserver",
            with_values(minimal, {"keyserver.tls.mutual.enabled": True, "tests.enabled": False}),
        ),
        ("minimal+keyserver-only", with_value(minimal, "aggregator.enabled", False)),
        (
            "minimal+aggregator-only",
            with_values(minimal, {"keyserver.enabled": False, "aggregator.keyserverUrl": "https://keys.example.org"}),
        ),
        (
            "minimal+monitoring",
            with_values(
                minimal,
                {
                    "metrics.serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
                    "grafana.dashboards": {"enabled": True, "namespace": "monitoring"},
                },
            ),
        ),
        (
            "agents+monitoring",
            with_value(
                agents, "metrics.serviceMonitor", {"enabled": True, "clientCertSecret": "fedhe-prometheus-client"}
            ),
        ),
        ("insecure+monitoring", with_value(insecure(minimal), "metrics.serviceMonitor.enabled", True)),
    ]
    return found


VARIANTS = variants()


@pytest.fixture(scope="module", params=VARIANTS, ids=[name for name, _ in VARIANTS])
def variant(request: pytest.FixtureRequest, chart: helm.Chart) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    _, values = request.param
    return values, render(chart, values)


TLS_VARIANTS = [(name, values) for name, values in VARIANTS if not values.get("tls", {}).get("insecureHttp")]


@pytest.fixture(scope="module", params=TLS_VARIANTS, ids=[name for name, _ in TLS_VARIANTS])
def tls_variant(request: pytest.FixtureRequest, chart: helm.Chart) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    _, values = request.param
    return values, render(chart, values)


def enabled(values: dict[str, Any], name: str) -> bool:
    return bool(values.get(name, {}).get("enabled", True))


def is_insecure(values: dict[str, Any]) -> bool:
    return bool(values.get("tls", {}).get("insecureHttp", False))


def mutual(values: dict[str, Any], name: str) -> bool:
    return bool(values.get(name, {}).get("tls", {}).get("mutual", {}).get("enabled", False))


# ---- the chart as a whole ---------------------------------------------------------------------


def test_scenario_files_exist() -> None:
    assert set(SCENARIOS) >= {
        "minimal-values.yaml",
        "insecure-trial-values.yaml",
        "with-agents-values.yaml",
        "production-keyserver-values.yaml",
        "production-coordinator-values.yaml",
    }


def test_chart_metadata(chart: helm.Chart) -> None:
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "fedhe"
    assert meta["version"] == "0.2.0"  # values changed incompatibly with 0.1.0 (TLS, new Secrets)
    assert meta["appVersion"] == "0.1.0"
    assert chart.values["image"]["tag"] == "0.1.0"


def test_defaults_are_https_both_services_and_no_secret(chart: helm.Chart) -> None:
    defaults = chart.values
    assert defaults["tls"]["insecureHttp"] is False
    assert defaults["tls"]["certManager"]["enabled"] is False
    assert defaults["keyserver"]["enabled"] is True
    assert defaults["aggregator"]["enabled"] is True
    secret_names = [
        defaults["keyserver"]["kek"]["existingSecret"],
        defaults["keyserver"]["bootstrapAdmin"]["existingSecret"],
        defaults["keyserver"]["aggregatorToken"]["existingSecret"],
        defaults["aggregator"]["bootstrapAdmin"]["existingSecret"],
        defaults["aggregator"]["keyserverToken"]["existingSecret"],
        defaults["keyserver"]["tls"]["existingSecret"],
        defaults["aggregator"]["tls"]["existingSecret"],
    ]
    assert secret_names == [""] * len(secret_names)
    text = (CHART_DIR / "values.yaml").read_text(encoding="utf-8")
    assert not re.search(r"(?i)(token|kek|password|secret)\s*:\s*['\"]?[A-Za-z0-9+/=_-]{16,}", text)


def test_schema_is_draft07_and_closed(chart: helm.Chart) -> None:
    schema = chart.schema
    assert schema is not None
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    assert {"keyserver", "aggregator", "tls"} <= set(schema["required"])
    with pytest.raises(helm.HelmValuesError, match="additional properties 'replicaCount' not allowed"):
        chart.validate_schema(with_value(scenario_values("minimal-values.yaml"), "replicaCount", 2))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("keyserver.existingSecret", "fedhe-keyserver"),  # the old single Secret with shared tokens
        ("aggregator.existingSecret", "fedhe-keyserver"),
        ("keyserver.aggregatorUrl", "https://aggregator:8080"),  # the keyserver no longer calls it
        ("aggregator.maxUploadBytes", 1024),  # moved to aggregator.limits
        ("tls.insecureHttp", "yes"),
        ("keyserver.keyReleaseMaxSkewSeconds", 5),
        ("keyserver.limits.rateLimitPerAddress", 0),
        ("keyserver.bootstrapAdmin.name", "Admin"),
        ("keyserver.tls.extraDnsNames", ["not a name"]),
        ("aggregator.membershipCacheSeconds", 301),
        ("aggregator.uploadRetentionDays", -1),
        ("aggregator.service.externalTrafficPolicy", "Nearest"),
        ("aggregator.keyserverUrl", "ftp://keys.example.org"),
        ("tls.certManager.privateKey.algorithm", "DSA"),
        ("tls.certManager.privateKey", {"algorithm": "RSA", "size": 256}),
        ("tls.certManager.privateKey", {"algorithm": "ECDSA", "size": 2048}),
        ("metrics.podAnnotations", {"prometheus.io/scrape": "true"}),  # a switch: extra ones go in *.podAnnotations
        ("metrics.serviceMonitor.interval", "30 seconds"),
        ("metrics.serviceMonitor.clientCertSecret", "Not_A_Secret"),
        ("grafana.dashboards.label", "not a label"),
        ("grafana.dashboards.labelValue", 1),
        ("grafana.dashboards.namespace", "Monitoring"),
        ("grafana.dashboards.json", "{}"),
    ],
)
def test_schema_refuses_old_and_bad_values(chart: helm.Chart, key: str, value: Any) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(with_value(scenario_values("minimal-values.yaml"), key, value))


@pytest.mark.parametrize("name", SCENARIOS)
def test_lint_is_clean(name: str) -> None:
    report = helm.lint(
        CHART_DIR, scenario_values(name), strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
    )
    assert report["errors"] == []
    findings = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert findings == []


def test_manifests_are_valid_kubernetes_objects(variant: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    _, objects = variant
    assert objects
    for obj in objects:
        if obj["kind"] == "Certificate":
            jsonschema.validate(obj, CERTIFICATE_SCHEMA)
        elif obj["kind"] == "ServiceMonitor":
            jsonschema.validate(obj, SERVICE_MONITOR_SCHEMA)
        else:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_expected_objects(variant: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    values, objects = variant
    services = {component(s): s for s in by_kind(objects, "Service")}
    scheme = "http" if is_insecure(values) else "https"
    for name, port in (("keyserver", 8090), ("aggregator", 8080)):
        if not enabled(values, name):
            assert name not in services
            assert deployments(objects, name) == []
            continue
        service_port = values.get(name, {}).get("service", {}).get("port", port)
        assert services[name]["spec"]["ports"] == [
            {"name": scheme, "port": service_port, "targetPort": scheme, "protocol": "TCP"}
        ]
        assert container(deployment(objects, name))["ports"] == [
            {"name": scheme, "containerPort": port, "protocol": "TCP"}
        ]
        assert container(deployment(objects, name))["args"] == [name, "serve"]
    agents = deployments(objects, "agent")
    assert len(agents) == len(values.get("agents", []))
    for agent in agents:
        assert agent["spec"]["replicas"] == 1
        assert agent["spec"]["strategy"]["type"] == "Recreate"
    pods = by_kind(objects, "Pod")
    assert len(pods) == (1 if values.get("tests", {}).get("enabled", True) else 0)
    for pod in pods:
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        assert pod["spec"]["restartPolicy"] == "Never"


def test_aggregator_replicas_follow_values(variant: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    values, objects = variant
    if enabled(values, "aggregator"):
        expected = values.get("aggregator", {}).get("replicas", 1)
        assert deployment(objects, "aggregator")["spec"]["replicas"] == expected


def test_coordinator_runs_two_aggregators_behind_a_budget(chart: helm.Chart) -> None:
    values = scenario_values("production-coordinator-values.yaml")
    assert values["aggregator"]["replicas"] == 2
    objects = render(chart, values)
    [pdb] = by_kind(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    selector = deployment(objects, "aggregator")["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    env = env_of(container(deployment(objects, "aggregator")))
    assert env["FEDHE_AGGREGATOR_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "fedhe-aggregator-redis"


def test_replicas_are_configurable(chart: helm.Chart) -> None:
    values = with_value(scenario_values("minimal-values.yaml"), "aggregator.replicas", 3)
    values["aggregator"]["redis"] = {"existingSecret": "fedhe-redis"}
    assert deployment(render(chart, values), "aggregator")["spec"]["replicas"] == 3


def test_names_fit_in_dns_labels(chart: helm.Chart) -> None:
    """With the longest release name Helm allows (53) and a 40-character site, names stay unique and <= 63."""
    values = cert_manager(scenario_values("with-agents-values.yaml"))
    for agent in values["agents"]:
        agent.pop("tls")
    values["agents"][0]["name"] = "s" * 40
    values = with_values(values, {"metrics.serviceMonitor.enabled": True, "grafana.dashboards.enabled": True})
    manifests = chart.render(values, name="r" * 53, namespace=NAMESPACE)
    names = [
        (doc["kind"], doc["metadata"]["name"])
        for path, text in manifests.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    assert ("Certificate", "r" * 53 + "-agent-" + "s" * 40 + "-client-tls") not in names  # shortened
    assert len(set(names)) == len(names)
    assert all(len(name) <= 63 for _, name in names), names


# ---- hardening --------------------------------------------------------------------------------


def test_every_container_is_hardened(variant: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    _, objects = variant
    specs = pod_specs(objects)
    assert specs
    for name, spec in specs:
        pod_sc = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, name
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert spec.get("hostNetwork") is not True, name
        assert spec.get("hostPID") is not True, name
        for c in containers(spec):
            sc = c["securityContext"]
            where = f"{name}/{c['name']}"
            assert sc["runAsNonRoot"] is True, where
            assert pod_sc.get("runAsNonRoot") is True, where
            assert sc.get("runAsUser", pod_sc.get("runAsUser")) == 10001, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc.get("privileged", False) is False, where
            assert "ALL" in sc["capabilities"]["drop"], where
            assert not sc["capabilities"].get("add"), where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), where


def test_scratch_space_for_read_only_root(scenario: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    """The HE codec writes ciphertext scratch files to /dev/shm (or TMPDIR): both are writable emptyDirs."""
    _, objects = scenario
    for d in by_kind(objects, "Deployment"):
        spec = d["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        c = container(d)
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["sizeLimit"]
        assert env_of(c)["TMPDIR"]["value"] == "/tmp"


def test_images_are_pinned(variant: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    _, objects = variant
    for name, spec in pod_specs(objects):
        for c in containers(spec):
            reference = c["image"].split("@", 1)[0]
            last = reference.rsplit("/", 1)[-1]
            assert ":" in last, f"{name}: {c['image']} has no tag"
            tag = last.rsplit(":", 1)[1]
            assert tag, f"{name}: {c['image']}"
            assert tag.lower() != "latest", f"{name}: {c['image']}"


@pytest.mark.parametrize(
    ("key", "tag", "message"),
    [
        ("image.tag", "latest", r'image\.tag is "latest"'),
        ("image.tag", "LATEST", r'image\.tag is "latest"'),
        ("image.tag", "", r"image\.tag is empty"),
        ("tests.image.tag", "latest", r'tests\.image\.tag is "latest"'),
    ],
)
def test_unpinned_tags_are_refused(chart: helm.Chart, key: str, tag: str, message: str) -> None:
    values = with_value(scenario_values("minimal-values.yaml"), key, tag)
    with pytest.raises(helm.HelmRenderError, match=message):
        render(chart, values)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("containerSecurityContext.readOnlyRootFilesystem", False),
        ("containerSecurityContext.runAsNonRoot", False),
        ("containerSecurityContext.allowPrivilegeEscalation", True),
        ("containerSecurityContext.privileged", True),
        ("containerSecurityContext.capabilities", {"drop": ["ALL"], "add": ["NET_ADMIN"]}),
        ("containerSecurityContext.capabilities", {"drop": ["NET_RAW"]}),
        ("podSecurityContext.runAsUser", 0),
        ("podSecurityContext.seccompProfile", {"type": "Unconfined"}),
    ],
)
def test_schema_refuses_weakened_security(chart: helm.Chart, key: str, value: Any) -> None:
    with pytest.raises(helm.HelmValuesError):
        render(chart, with_value(scenario_values("minimal-values.yaml"), key, value))


# ---- secrets ----------------------------------------------------------------------------------


def test_no_secret_material_is_rendered(variant: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    _, objects = variant
    assert by_kind(objects, "Secret") == []
    for cm in by_kind(objects, "ConfigMap"):
        # Only site privacy policies and the Grafana dashboard.
        assert set(cm["data"]) == ({"fedhe.json"} if component(cm) == "dashboard" else {"policy.json"})
    for name, spec in pod_specs(objects):
        for c in containers(spec):
            mounted_files(spec, c)  # asserts every Secret volume is mounted read-only
            for env in c.get("env", []):
                where = f"{name}/{c['name']}: {env['name']}"
                if env["name"].endswith("_FILE"):
                    assert env["value"].startswith("/"), where
                    continue
                if SECRET_NAME.search(env["name"]):
                    assert "value" not in env, f"{where} is a plain value"
                    assert env["valueFrom"]["secretKeyRef"]["name"], where
                if env["name"].endswith("REDIS_URL") and "value" in env:
                    assert "@" not in env["value"], f"{where} carries credentials"


def test_secret_files_point_into_read_only_secret_mounts(
    variant: tuple[dict[str, Any], list[dict[str, Any]]],
) -> None:
    _, objects = variant
    for d in by_kind(objects, "Deployment"):
        spec = d["spec"]["template"]["spec"]
        c = container(d)
        files = mounted_files(spec, c)
        for env in c["env"]:
            if env["name"].endswith("_FILE") and not env["name"].endswith("POLICY_FILE"):
                assert env["value"] in files, env


def test_each_secret_is_its_own(chart: helm.Chart) -> None:
    """KEK, both admins' tokens and the service token come from the Secrets named for them."""
    objects = render(chart, scenario_values("minimal-values.yaml"))
    ks = deployment(objects, "keyserver")
    ks_files = mounted_files(ks["spec"]["template"]["spec"], container(ks))
    ks_env = plain_env(container(ks))
    assert ks_files[ks_env["FEDHE_KEYSERVER_KEK_FILE"]] == ("fedhe-keyserver-kek", "kek")
    assert ks_files[ks_env["FEDHE_KEYSERVER_BOOTSTRAP_ADMIN_TOKEN_FILE"]] == ("fedhe-keyserver-admin", "token")
    assert ks_files[ks_env["FEDHE_KEYSERVER_AGGREGATOR_TOKEN_FILE"]] == ("fedhe-aggregator-service", "token")
    assert ks_env["FEDHE_KEYSERVER_BOOTSTRAP_ADMIN"] == "bootstrap-admin"
    ag = deployment(objects, "aggregator")
    ag_files = mounted_files(ag["spec"]["template"]["spec"], container(ag))
    ag_env = plain_env(container(ag))
    assert ag_files[ag_env["FEDHE_AGGREGATOR_BOOTSTRAP_ADMIN_TOKEN_FILE"]] == ("fedhe-aggregator-admin", "token")
    # The same value reaches both ends: the keyserver registers what the aggregator presents.
    assert ag_files[ag_env["FEDHE_AGGREGATOR_KEYSERVER_TOKEN_FILE"]] == ("fedhe-aggregator-service", "token")
    # The keyserver's admin token and KEK never reach the aggregator's pod, nor the other way round.
    assert not {s for s, _ in ag_files.values()} & {"fedhe-keyserver-admin", "fedhe-keyserver-kek"}
    assert "fedhe-aggregator-admin" not in {s for s, _ in ks_files.values()}


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("keyserver.kek.existingSecret", r"keyserver\.kek\.existingSecret is required.*key kek"),
        ("keyserver.bootstrapAdmin.existingSecret", r"keyserver\.bootstrapAdmin\.existingSecret is required.*token"),
        ("keyserver.aggregatorToken.existingSecret", r"keyserver\.aggregatorToken\.existingSecret .*is required"),
        ("keyserver.database.existingSecret", r"keyserver\.database\.existingSecret is required"),
        ("aggregator.bootstrapAdmin.existingSecret", r"aggregator\.bootstrapAdmin\.existingSecret is required"),
        ("aggregator.keyserverToken.existingSecret", r"aggregator\.keyserverToken\.existingSecret is required"),
        ("aggregator.database.existingSecret", r"aggregator\.database\.existingSecret is required"),
    ],
)
def test_missing_secret_fails_with_a_message(chart: helm.Chart, key: str, message: str) -> None:
    values = with_value(scenario_values("minimal-values.yaml"), key, "")
    with pytest.raises(helm.HelmRenderError, match=message):
        render(chart, values)


def test_service_token_must_be_one_value_in_a_combined_install(chart: helm.Chart) -> None:
    values = with_value(scenario_values("minimal-values.yaml"), "aggregator.keyserverToken.existingSecret", "other")
    with pytest.raises(helm.HelmRenderError, match="must name the same Secret and key"):
        render(chart, values)


def test_agent_without_secret_fails_with_a_message(chart: helm.Chart) -> None:
    values = scenario_values("with-agents-values.yaml")
    del values["agents"][1]["existingSecret"]
    with pytest.raises(helm.HelmRenderError, match=r"agents\[1\]\.existingSecret \(site site-b\) is required"):
        render(chart, values)


def test_plain_secret_in_extra_env_is_refused(chart: helm.Chart) -> None:
    values = with_value(
        scenario_values("minimal-values.yaml"),
        "aggregator.extraEnv",
        [{"name": "FEDHE_AGGREGATOR_KEYSERVER_TOKEN", "value": "not-a-real-token"}],
    )
    with pytest.raises(helm.HelmRenderError, match="FEDHE_AGGREGATOR_KEYSERVER_TOKEN has a plain value"):
        render(chart, values)


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("aggregator.extraEnv", "FEDHE_AGGREGATOR_INSECURE_HTTP"),
        ("keyserver.extraEnv", "FEDHE_KEYSERVER_TLS_CLIENT_CA_FILE"),
        ("agentDefaults.extraEnv", "FEDHE_AGENT_INSECURE_HTTP"),
    ],
)
def test_tls_cannot_be_switched_through_extra_env(chart: helm.Chart, key: str, name: str) -> None:
    values = with_value(scenario_values("with-agents-values.yaml"), key, [{"name": name, "value": "true"}])
    with pytest.raises(helm.HelmRenderError, match=f"{name} is set by the chart from the tls values"):
        render(chart, values)


@pytest.mark.parametrize("service", ["aggregator", "keyserver"])
def test_redis_url_with_password_is_refused(chart: helm.Chart, service: str) -> None:
    values = with_value(scenario_values("minimal-values.yaml"), f"{service}.redis", {"url": "redis://:pw@redis:6379/0"})
    with pytest.raises(helm.HelmError):
        render(chart, values)


def test_a_redis_key_prefix_given_is_used_and_a_bad_one_refused(chart: helm.Chart) -> None:
    redis = {"url": "redis://redis-master:6379/0", "keyPrefix": "hospital-trial"}
    values = with_value(scenario_values("minimal-values.yaml"), "aggregator.redis", redis)
    ag = env_of(container(deployment(render(chart, values), "aggregator")))
    assert ag["FEDHE_AGGREGATOR_REDIS_KEY_PREFIX"]["value"] == "hospital-trial"
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(with_value(values, "aggregator.redis", {**redis, "keyPrefix": "Bad Prefix:*"}))


def test_an_upload_retention_period_is_passed_on_only_when_set(chart: helm.Chart) -> None:
    values = scenario_values("minimal-values.yaml")
    unset = env_of(container(deployment(render(chart, values), "aggregator")))
    assert "FEDHE_AGGREGATOR_UPLOAD_RETENTION_DAYS" not in unset
    kept = with_value(values, "aggregator.uploadRetentionDays", 14)
    ag = env_of(container(deployment(render(chart, kept), "aggregator")))
    assert ag["FEDHE_AGGREGATOR_UPLOAD_RETENTION_DAYS"]["value"] == "14"


def test_several_aggregators_need_redis(chart: helm.Chart) -> None:
    values = with_value(scenario_values("minimal-values.yaml"), "aggregator.replicas", 2)
    with pytest.raises(helm.HelmRenderError, match="needs a shared Redis"):
        render(chart, values)


# ---- configuration ----------------------------------------------------------------------------


def test_environment_variable_names(variant: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    values, objects = variant
    if enabled(values, "keyserver"):
        ks = env_of(container(deployment(objects, "keyserver")))
        assert set(ks) >= KEYSERVER_ENV
        assert ks["FEDHE_KEYSERVER_HOST"]["value"] == "0.0.0.0"
        assert ks["FEDHE_KEYSERVER_PORT"]["value"] == "8090"
        redis = values["keyserver"].get("redis", {})
        assert ("FEDHE_KEYSERVER_REDIS_URL" in ks) == bool(redis)
        if redis:
            assert ks["FEDHE_KEYSERVER_REDIS_KEY_PREFIX"]["value"] == f"{NAMESPACE}.{RELEASE}"
        given = bool(values["keyserver"].get("aggregatorToken", {}).get("existingSecret"))
        assert ("FEDHE_KEYSERVER_AGGREGATOR_TOKEN_FILE" in ks) == given
    if enabled(values, "aggregator"):
        ag = env_of(container(deployment(objects, "aggregator")))
        redis = values["aggregator"].get("redis", {})
        assert set(ag) >= AGGREGATOR_ENV
        assert ("FEDHE_AGGREGATOR_REDIS_URL" in ag) == bool(redis)
        if redis:
            assert ag["FEDHE_AGGREGATOR_REDIS_KEY_PREFIX"]["value"] == f"{NAMESPACE}.{RELEASE}"
        assert ag["FEDHE_AGGREGATOR_PORT"]["value"] == "8080"
        assert int(ag["FEDHE_AGGREGATOR_MAX_UPLOAD_BYTES"]["value"]) > 0
        expected = values["aggregator"].get("keyserverUrl") or KEYSERVER_URL
        if is_insecure(values):
            expected = expected.replace("https://", "http://")
        assert ag["FEDHE_AGGREGATOR_KEYSERVER_URL"]["value"] == expected
    for d in deployments(objects, "agent"):
        agent = env_of(container(d))
        assert set(agent) >= AGENT_ENV
        assert "FEDHE_AGENT_POLICY_FILE" in agent  # both scenario sites have a policy


def test_every_variable_is_a_setting_of_its_service(variant: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    """Each FEDHE_<SVC>_* variable the chart sets names a field of that service's settings class."""
    _, objects = variant
    for d in by_kind(objects, "Deployment"):
        name = component(d)
        fields = set(SETTINGS[name].model_fields)
        for env in container(d)["env"]:
            if env["name"].startswith("FEDHE_"):
                prefix = PREFIX[name] + "_"
                assert env["name"].startswith(prefix), env["name"]
                assert env["name"][len(prefix) :].lower() in fields, f"{name}: {env['name']} is no setting"


def test_removed_settings_appear_nowhere(
    variant: tuple[dict[str, Any], list[dict[str, Any]]], chart: helm.Chart
) -> None:
    values, objects = variant
    assert not REMOVED.search(yaml.safe_dump_all(objects))
    assert not REMOVED.search(notes(chart, values))


def test_settings_load_from_the_rendered_environment(
    variant: tuple[dict[str, Any], list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The services' own settings classes accept what the chart gives them, and agree on the audience."""
    values, objects = variant
    audiences: dict[str, str] = {}
    for d in by_kind(objects, "Deployment"):
        name = component(d)
        with monkeypatch.context() as patch:
            for env in list(os.environ):
                if env.startswith("FEDHE_"):
                    patch.delenv(env)
            for env in container(d)["env"]:
                value = env.get("value", "postgresql+psycopg://from-a-secret/db")
                patch.setenv(env["name"], value)
            settings = SETTINGS[name]()
        if isinstance(settings, KeyserverSettings):
            audiences["keyserver"] = settings.audience()
            assert settings.insecure_http is is_insecure(values)
        elif isinstance(settings, AggregatorSettings):
            assert settings.insecure_http is is_insecure(values)
            assert settings.keyserver_url.startswith("http://" if is_insecure(values) else "https://")
        elif isinstance(settings, AgentSettings):
            audiences[d["metadata"]["name"]] = settings.keyserver_audience()
            assert settings.insecure_http is is_insecure(values)
    if "keyserver" in audiences:
        assert set(audiences.values()) == {audiences["keyserver"]}, audiences


def test_agent_state_survives_restarts(chart: helm.Chart) -> None:
    objects = render(chart, scenario_values("with-agents-values.yaml"))
    claims = {c["metadata"]["name"]: c for c in by_kind(objects, "PersistentVolumeClaim")}
    assert claims[f"{RELEASE}-fedhe-agent-site-a-state"]["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert f"{RELEASE}-fedhe-agent-site-b-state" not in claims  # site-b brings its own claim
    for d in deployments(objects, "agent"):
        volumes = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
        assert "persistentVolumeClaim" in volumes["state"]


# ---- TLS --------------------------------------------------------------------------------------


def tls_secret(values: dict[str, Any], name: str) -> str:
    if values.get("tls", {}).get("certManager", {}).get("enabled"):
        return f"{RELEASE}-fedhe-{name}-tls"
    return str(values[name]["tls"]["existingSecret"])


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
    if not pods:
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


# ---- split installs ---------------------------------------------------------------------------


def test_keyserver_owner_installs_only_the_keyserver(chart: helm.Chart) -> None:
    values = scenario_values("production-keyserver-values.yaml")
    objects = render(chart, values)
    components = {o["metadata"]["labels"].get("app.kubernetes.io/component") for o in objects}
    # None: the ServiceAccount; metrics: Prometheus's client certificate for the ServiceMonitor.
    assert components <= {"keyserver", "test", "metrics", None}
    env = env_of(container(deployment(objects, "keyserver")))
    assert env["FEDHE_KEYSERVER_PUBLIC_URL"]["value"] == values["keyserver"]["publicUrl"]
    # Without an aggregator in the release its token may instead be issued through the API.
    values["keyserver"].pop("aggregatorToken")
    env = env_of(container(deployment(render(chart, values), "keyserver")))
    assert "FEDHE_KEYSERVER_AGGREGATOR_TOKEN_FILE" not in env


def test_coordinator_installs_only_the_aggregator(chart: helm.Chart) -> None:
    values = scenario_values("production-coordinator-values.yaml")
    objects = render(chart, values)
    assert deployments(objects, "keyserver") == []
    assert {component(s) for s in by_kind(objects, "Service")} == {"aggregator"}
    d = deployment(objects, "aggregator")
    env = plain_env(container(d))
    assert env["FEDHE_AGGREGATOR_KEYSERVER_URL"] == values["aggregator"]["keyserverUrl"]
    files = mounted_files(d["spec"]["template"]["spec"], container(d))
    assert files[env["FEDHE_AGGREGATOR_TLS_CA_FILE"]] == ("fedhe-keyserver-ca", "ca.crt")
    del values["aggregator"]["keyserverUrl"]
    with pytest.raises(
        helm.HelmRenderError, match=r"aggregator\.keyserverUrl is required when keyserver\.enabled is false"
    ):
        render(chart, values)


def test_agents_must_name_the_keyserver_audience(chart: helm.Chart) -> None:
    values = with_value(scenario_values("with-agents-values.yaml"), "keyserver.publicUrl", "https://keys.example.org/")
    objects = render(chart, values)
    for d in deployments(objects, "agent"):
        assert env_of(container(d))["FEDHE_AGENT_KEYSERVER_URL"]["value"] == "https://keys.example.org"
    assert env_of(container(deployment(objects, "keyserver")))["FEDHE_KEYSERVER_PUBLIC_URL"]["value"] == (
        "https://keys.example.org"
    )
    values = with_value(values, "agentDefaults.keyserverUrl", KEYSERVER_URL)
    with pytest.raises(helm.HelmRenderError, match=r"agents\[0\]\.keyserverUrl is .* but keyserver\.publicUrl is"):
        render(chart, values)


def test_agents_need_urls_of_services_outside_the_release(chart: helm.Chart) -> None:
    values = with_values(
        scenario_values("with-agents-values.yaml"),
        {"keyserver.enabled": False, "aggregator.keyserverUrl": "https://keys.example.org"},
    )
    with pytest.raises(helm.HelmRenderError, match=r"agents\[0\]\.keyserverUrl .*is required"):
        render(chart, values)
    values = with_value(values, "agentDefaults.keyserverUrl", "https://keys.example.org")
    objects = render(chart, values)
    for d in deployments(objects, "agent"):
        assert env_of(container(d))["FEDHE_AGENT_KEYSERVER_URL"]["value"] == "https://keys.example.org"


# ---- network -----------------------------------------------------------------------------------


def _selects(peer: dict[str, Any], name: str) -> bool:
    labels = peer.get("podSelector", {}).get("matchLabels", {})
    return labels.get("app.kubernetes.io/component") == name and "namespaceSelector" not in peer


def test_keyserver_and_aggregator_policies(variant: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    """The keyserver never calls the aggregator: no policy lets it, and none expects it to."""
    values, objects = variant
    policies = {component(p): p["spec"] for p in by_kind(objects, "NetworkPolicy")}
    if "keyserver" in policies:
        ks = policies["keyserver"]
        for rule in ks.get("egress", []):
            assert not any(_selects(peer, "aggregator") for peer in rule.get("to", []))
        for rule in ks["ingress"]:
            assert rule["from"], "an empty from would admit everybody"
    if "aggregator" in policies:
        ag = policies["aggregator"]
        for rule in ag["ingress"]:
            assert rule["from"]
            assert not any(_selects(peer, "keyserver") for peer in rule["from"])
        if "Egress" in ag["policyTypes"] and enabled(values, "keyserver"):
            assert any(_selects(peer, "keyserver") for rule in ag["egress"] for peer in rule.get("to", []))


def test_network_policies(chart: helm.Chart) -> None:
    open_objects = render(chart, scenario_values("minimal-values.yaml"))
    policies = {component(p): p for p in by_kind(open_objects, "NetworkPolicy")}
    assert set(policies) == {"keyserver", "aggregator"}
    assert policies["keyserver"]["spec"]["ingress"][0]["from"] == [{"podSelector": {}}]
    assert policies["keyserver"]["spec"]["ingress"][0]["ports"] == [{"port": 8090, "protocol": "TCP"}]
    assert policies["keyserver"]["spec"]["policyTypes"] == ["Ingress"]

    restricted = render(chart, scenario_values("with-agents-values.yaml"))
    policies = {component(p): p for p in by_kind(restricted, "NetworkPolicy")}
    peers = policies["keyserver"]["spec"]["ingress"][0]["from"]
    allowed = {p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in peers if "podSelector" in p}
    assert allowed == {"aggregator", "agent", "test"}
    peers = policies["aggregator"]["spec"]["ingress"][0]["from"]
    allowed = {p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in peers if "podSelector" in p}
    assert allowed == {"agent", "test"}

    keyserver_only = render(chart, scenario_values("production-keyserver-values.yaml"))
    [policy] = by_kind(keyserver_only, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert {"ipBlock": {"cidr": "198.51.100.0/24"}} in policy["spec"]["ingress"][0]["from"]
    dns, data = policy["spec"]["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert "to" not in dns
    assert data == {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keyserver-data"}}}]}

    nobody = with_values(
        scenario_values("minimal-values.yaml"),
        {"aggregator.enabled": False, "tests.enabled": False, "networkPolicy.keyserver.restrict": True},
    )
    [policy] = by_kind(render(chart, nobody), "NetworkPolicy")
    assert policy["spec"]["ingress"] == []

    disabled = render(chart, with_value(scenario_values("minimal-values.yaml"), "networkPolicy.enabled", False))
    assert by_kind(disabled, "NetworkPolicy") == []


def test_external_services_keep_client_addresses(chart: helm.Chart) -> None:
    objects = render(chart, scenario_values("production-coordinator-values.yaml"))
    [service] = by_kind(objects, "Service")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    for service in by_kind(render(chart, scenario_values("minimal-values.yaml")), "Service"):
        assert "externalTrafficPolicy" not in service["spec"]  # only valid for NodePort/LoadBalancer


# ---- metrics, ServiceMonitors and the Grafana dashboard ----------------------------------------

DASHBOARD_FILE = CHART_DIR / "dashboards" / "fedhe.json"

# What the services export (family: type, labels), as the operator guide lists it. The dashboard
# may use these and nothing else; test_metric_catalogue_is_what_the_services_export keeps this
# list honest against the services' own registries.
EXPORTED: dict[str, tuple[str, tuple[str, ...]]] = {
    "fedhe_updates_accepted": ("counter", ()),
    "fedhe_update_bytes_accepted": ("counter", ()),
    "fedhe_updates_rejected": ("counter", ("code",)),
    "fedhe_updates_declined": ("counter", ("reason",)),
    "fedhe_rounds_published": ("counter", ()),
    "fedhe_rounds_failed": ("counter", ()),
    "fedhe_round_duration_seconds": ("histogram", ()),
    "fedhe_heartbeats": ("counter", ()),
    "fedhe_sites": ("gauge", ("status",)),
    "fedhe_sites_online": ("gauge", ()),
    "fedhe_jobs": ("gauge", ("status",)),
    "fedhe_http_requests": ("counter", ("route", "method", "status")),
    "fedhe_http_request_duration_seconds": ("histogram", ("route",)),
    "fedhe_key_releases": ("counter", ("outcome",)),
}
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
# Sample name -> family, for every series name a query may use.
SAMPLES = {family + suffix: family for family, (kind, _) in EXPORTED.items() for suffix in SUFFIXES[kind]}
# Labels a scrape adds to every series: the namespace, and the pod labels the ServiceMonitor's
# podTargetLabels (or an annotation job's labelmap) copy. The dashboard filters on them.
TARGET_LABELS = {"namespace", "app_kubernetes_io_instance", "app_kubernetes_io_component"}
PROMQL_FUNCTIONS = {"sum", "max", "rate", "increase", "histogram_quantile", "label_values"}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool"}
# Variables the dashboard may use: its own, and Grafana's built-ins.
GRAFANA_BUILTINS = {"__range", "__rate_interval"}


def test_metric_catalogue_is_what_the_services_export() -> None:
    """EXPORTED names exactly the families, types and labels of the aggregator's and keyserver's registries."""
    found: dict[str, str] = {}
    samples: set[str] = set()
    for owner in (Metrics(), KeyserverMetrics()):
        registry = owner.registry
        assert isinstance(registry, CollectorRegistry)
        for metric in [*vars(owner).values(), *vars(owner.http).values()]:
            if isinstance(metric, Counter | Gauge | Histogram):
                [family] = metric.describe()
                kind, labels = EXPORTED[family.name]
                assert family.type == kind, family.name
                if labels:  # prometheus_client refuses label names other than the metric's own
                    metric.labels(**dict.fromkeys(labels, "x"))
        for family in registry.collect():
            found[family.name] = family.type
            for sample in family.samples:
                samples.add(sample.name)
                assert set(sample.labels) - {"le"} == set(EXPORTED[family.name][1]), sample
    assert found == {family: kind for family, (kind, _) in EXPORTED.items()}
    assert set(SAMPLES) <= samples


def promql_problems(expr: str) -> list[str]:
    """What is wrong with a dashboard query: unknown functions, metrics, labels or variables.

    Not a PromQL parser: it strips strings, label matchers, grouping lists and ranges (collecting
    the label names they hold), then every identifier left is a function, a keyword or a metric.
    """
    problems: list[str] = []
    variables = set(re.findall(r"\$\{?(\w+)", expr))
    problems += [f"unknown variable ${v}" for v in variables - GRAFANA_BUILTINS - {"namespace", "release"}]
    labels: set[str] = set()
    text = expr.strip()
    label_values = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", text)
    if label_values:  # a Grafana variable query: label_values(selector, label)
        text, labels = label_values.group(1), {label_values.group(2)}
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    for block in re.findall(r"\{([^}]*)\}", text):
        for matcher in filter(None, (m.strip() for m in block.split(","))):
            parsed = re.fullmatch(r'(\w+)\s*(=~|!~|!=|=)\s*""', matcher)
            if not parsed:
                problems.append(f"unreadable matcher {matcher}")
                continue
            labels.add(parsed.group(1))
    text = re.sub(r"\{[^}]*\}", " ", text)
    for _, grouped in re.findall(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        labels |= {label.strip() for label in grouped.split(",") if label.strip()}
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    metrics: set[str] = set()
    functions: set[str] = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", text):
        name = match.group(0)
        if text[match.end() :].lstrip().startswith("("):
            functions.add(name)
        elif name not in PROMQL_KEYWORDS:
            metrics.add(name)
    problems += [f"unknown function {f}" for f in functions - PROMQL_FUNCTIONS]
    problems += [f"{m} is not exported by the services" for m in metrics - set(SAMPLES)]
    if not metrics:
        problems.append("no metric")
    allowed = set(TARGET_LABELS)
    for metric in metrics & set(SAMPLES):
        allowed |= set(EXPORTED[SAMPLES[metric]][1])
        if metric.endswith("_bucket"):
            allowed.add("le")
    problems += [f"label {label} is on none of {sorted(metrics)}" for label in labels - allowed]
    return problems


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("sum(rate(fedhe_update_accepted_total[5m]))", "fedhe_update_accepted_total is not exported"),
        ("fedhe_updates_accepted", "fedhe_updates_accepted is not exported"),  # counters end in _total
        ("sum(up)", "up is not exported"),
        ('max(fedhe_sites{state="approved"})', "label state is on none"),
        ("sum by (code) (rate(fedhe_key_releases_total[5m]))", "label code is on none"),
        ("histogram_quantile(0.9, sum by (le) (rate(fedhe_http_requests_total[5m])))", "label le is on none"),
        ("avg(fedhe_jobs)", "unknown function avg"),
        ('fedhe_jobs{namespace="$ns"}', "unknown variable $ns"),
    ],
)
def test_query_check_catches_mistakes(expr: str, problem: str) -> None:
    assert any(p.startswith(problem) for p in promql_problems(expr)), promql_problems(expr)


def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def dashboard_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable."""
    queries = [(f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    queries += [(f"variable {v['name']}", v["query"]) for v in board["templating"]["list"] if v["type"] == "query"]
    return queries


def test_dashboard_queries_use_only_exported_metrics() -> None:
    board = dashboard()
    queries = dashboard_queries(board)
    assert len(queries) > 20
    problems = {where: found for where, expr in queries if (found := promql_problems(expr))}
    assert problems == {}
    used = {SAMPLES[name] for _, expr in queries for name in re.findall(r"fedhe_\w+", expr) if name in SAMPLES}
    assert used == set(EXPORTED), f"no panel shows {set(EXPORTED) - used}"


def test_dashboard_panels_are_unique_and_described() -> None:
    board = dashboard()
    assert board["schemaVersion"] == 38  # Grafana 10.0; Grafana 10 and 11 migrate it on load
    assert board["uid"] == "fedhe-overview"
    assert board["id"] is None  # a fixed id would clash with the importing Grafana's own
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    titles = [p["title"] for p in panels]
    assert len(set(ids)) == len(ids), ids
    assert len(set(titles)) == len(titles), titles
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            assert "targets" not in panel
            continue
        assert panel["type"] in {"stat", "timeseries"}, panel["title"]
        assert len(panel.get("description", "")) >= 60, f"{panel['title']} needs a description for operators"
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs, panel["title"]
        assert len(set(refs)) == len(refs), panel["title"]
        for t in panel["targets"]:
            assert t["datasource"] == panel["datasource"], panel["title"]
            assert t["expr"].strip(), panel["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert set(variables) == {"datasource", "namespace", "release"}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "release"):
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def dashboard_configmaps(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in by_kind(objects, "ConfigMap") if component(o) == "dashboard"]


def test_dashboard_configmap_only_when_enabled(variant: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    values, objects = variant
    settings = values.get("grafana", {}).get("dashboards", {})
    configmaps = dashboard_configmaps(objects)
    if not settings.get("enabled"):
        assert configmaps == []
        return
    [cm] = configmaps
    assert cm["metadata"]["name"] == f"{RELEASE}-fedhe-dashboard"
    assert cm["metadata"]["namespace"] == (settings.get("namespace") or NAMESPACE)
    assert cm["metadata"]["labels"][settings.get("label", "grafana_dashboard")] == settings.get("labelValue", "1")
    assert cm["metadata"].get("annotations", {}) == settings.get("annotations", {})
    assert json.loads(cm["data"]["fedhe.json"]) == dashboard()


def test_dashboard_configmap_as_configured(chart: helm.Chart) -> None:
    values = with_values(
        scenario_values("minimal-values.yaml"),
        {
            "grafana.dashboards": {
                "enabled": True,
                "label": "dashboards.example.org/grafana",
                "labelValue": "fedhe",
                "namespace": "monitoring",
                "annotations": {"grafana_folder": "fedhe"},
            }
        },
    )
    [cm] = dashboard_configmaps(render(chart, values))
    kubernetes_validate.validate(cm, KUBE_VERSION, strict=True)
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["dashboards.example.org/grafana"] == "fedhe"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]
    assert cm["metadata"]["annotations"] == {"grafana_folder": "fedhe"}
    assert cm["data"]["fedhe.json"] == DASHBOARD_FILE.read_text(encoding="utf-8").strip()
    assert len(cm["data"]["fedhe.json"]) < 256 * 1024  # fits a ConfigMap, even through kubectl apply


def prometheus_annotations(d: dict[str, Any]) -> dict[str, str]:
    annotations = d["spec"]["template"]["metadata"].get("annotations", {})
    return {k: v for k, v in annotations.items() if k.startswith("prometheus.io/")}


def test_prometheus_pod_annotations(variant: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    """The annotations name the port and scheme the container really serves /metrics on."""
    values, objects = variant
    on = values.get("metrics", {}).get("podAnnotations", True)
    for name in ("keyserver", "aggregator"):
        if not enabled(values, name):
            continue
        d = deployment(objects, name)
        if not on:
            assert prometheus_annotations(d) == {}
            continue
        [port] = container(d)["ports"]
        assert prometheus_annotations(d) == {
            "prometheus.io/scrape": "true",
            "prometheus.io/scheme": port["name"],
            "prometheus.io/port": str(port["containerPort"]),
            "prometheus.io/path": "/metrics",
        }
        assert port["name"] == ("http" if is_insecure(values) else "https")
    for d in deployments(objects, "agent"):  # agents serve no HTTP
        assert prometheus_annotations(d) == {}


def test_pod_annotations_as_configured(chart: helm.Chart) -> None:
    values = with_values(
        scenario_values("minimal-values.yaml"),
        {"aggregator.podAnnotations": {"prometheus.io/scrape": "false", "example.org/team": "fl"}},
    )
    objects = render(chart, values)
    annotations = deployment(objects, "aggregator")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "false"  # the component's own annotations win
    assert annotations["example.org/team"] == "fl"
    assert annotations["prometheus.io/port"] == "8080"
    assert prometheus_annotations(deployment(objects, "keyserver"))["prometheus.io/port"] == "8090"
    objects = render(chart, with_value(scenario_values("minimal-values.yaml"), "metrics.podAnnotations", False))
    for name in ("keyserver", "aggregator"):
        assert "annotations" not in deployment(objects, name)["spec"]["template"]["metadata"]


def test_service_monitors_only_when_enabled(variant: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    """One ServiceMonitor per service, scraping its Service's port, verifying what that service serves."""
    values, objects = variant
    settings = values.get("metrics", {}).get("serviceMonitor", {})
    monitors = {component(m): m for m in by_kind(objects, "ServiceMonitor")}
    if not settings.get("enabled"):
        assert monitors == {}
        assert "monitoring.coreos.com" not in yaml.safe_dump_all(objects)
        return
    services = {component(s): s for s in by_kind(objects, "Service")}
    assert set(monitors) == set(services)
    certificates = {c["metadata"]["name"]: c["spec"] for c in by_kind(objects, "Certificate")}
    for name, monitor in monitors.items():
        spec = monitor["spec"]
        assert spec["selector"]["matchLabels"].items() <= services[name]["metadata"]["labels"].items()
        assert settings.get("labels", {}).items() <= monitor["metadata"]["labels"].items()
        pod_labels = deployment(objects, name)["spec"]["template"]["metadata"]["labels"]
        assert set(spec["podTargetLabels"]) <= set(pod_labels)
        assert {re.sub(r"[./]", "_", label) for label in spec["podTargetLabels"]} | {"namespace"} == TARGET_LABELS
        [endpoint] = spec["endpoints"]
        [port] = services[name]["spec"]["ports"]
        assert (endpoint["port"], endpoint["scheme"], endpoint["path"]) == (port["name"], port["name"], "/metrics")
        if is_insecure(values):
            assert "tlsConfig" not in endpoint
            continue
        tls = endpoint["tlsConfig"]
        assert tls["ca"] == {"secret": {"name": tls_secret(values, name), "key": "ca.crt"}}
        assert tls["serverName"] == f"{RELEASE}-fedhe-{name}.{NAMESPACE}.svc"
        if values.get("tls", {}).get("certManager", {}).get("enabled"):
            assert tls["serverName"] in certificates[f"{RELEASE}-fedhe-{name}"]["dnsNames"]
        if not mutual(values, name):
            assert "cert" not in tls
            assert "keySecret" not in tls
            continue
        client = settings.get("clientCertSecret") or f"{RELEASE}-fedhe-metrics-client-tls"
        assert tls["cert"] == {"secret": {"name": client, "key": "tls.crt"}}
        assert tls["keySecret"] == {"name": client, "key": "tls.key"}
        if not settings.get("clientCertSecret"):
            assert certificates[client]["secretName"] == client
            assert certificates[client]["usages"][-1] == "client auth"


def test_service_monitor_needs_a_client_certificate_under_mutual_tls(chart: helm.Chart) -> None:
    values = with_value(scenario_values("with-agents-values.yaml"), "metrics.serviceMonitor.enabled", True)
    with pytest.raises(
        helm.HelmRenderError,
        match=r"metrics\.serviceMonitor\.clientCertSecret is required: keyserver\.tls\.mutual\.enabled",
    ):
        render(chart, values)
    # With cert-manager the chart issues Prometheus's client certificate itself.
    values = cert_manager(values)
    for agent in values["agents"]:
        agent.pop("tls")
    values["tests"].pop("clientCertSecret")
    names = {c["metadata"]["name"] for c in by_kind(render(chart, values), "Certificate")}
    assert f"{RELEASE}-fedhe-metrics-client-tls" in names


# ---- documentation ----------------------------------------------------------------------------


def documented_keys() -> list[str]:
    """Dotted paths of the keys of values.yaml that carry a "# --" comment, checking that none is left out.

    A key is covered by its own "# --" comment or by a documented ancestor whose default is a whole object
    (e.g. resources). List items are part of their key's default.
    """
    documented: list[str] = []
    stack: list[tuple[int, str, bool]] = []  # (indent, key, covered)
    pending_doc = False
    for line in (CHART_DIR / "values.yaml").read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending_doc = True
            continue
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        match = re.match(r"([A-Za-z_][\w.-]*):", stripped)
        if stripped.startswith("-") or not match:
            pending_doc = False
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([*(k for _, k, _ in stack), match.group(1)])
        covered = any(c for *_, c in stack)
        if pending_doc:
            documented.append(path)
        leaf = stripped.split(":", 1)[1].strip() != ""
        assert pending_doc or covered or not leaf, f"values.yaml: {path} has no '# --' comment"
        stack.append((indent, match.group(1), pending_doc or covered))
        pending_doc = False
    return documented


def test_every_value_is_documented() -> None:
    keys = documented_keys()
    assert len(keys) > 50
    readme = (CHART_DIR / "README.md").read_text(encoding="utf-8")
    missing = [k for k in keys if f"`{k}`" not in readme]
    assert missing == [], f"README.md values table lacks {missing}"


def test_readme_covers_every_tls_mode_and_the_split_install() -> None:
    readme = (CHART_DIR / "README.md").read_text(encoding="utf-8")
    for needle in (
        "fedhe dev-ca",
        "kubectl -n fedhe create secret tls",
        "tls.certManager.enabled",
        "insecureHttp",
        "keyserver.enabled=false",
        "aggregator.enabled=false",
        "externalTrafficPolicy: Local",
        "FEDHE_CA_FILE",
    ):
        assert needle in readme, needle
    assert not REMOVED.search(readme)


def test_readme_explains_every_dashboard_panel_and_both_scrape_paths() -> None:
    readme = (CHART_DIR / "README.md").read_text(encoding="utf-8")
    for panel in dashboard()["panels"]:
        if panel["type"] != "row":
            assert f"| {panel['title']} |" in readme, panel["title"]
    for family, (kind, _) in EXPORTED.items():
        assert f"`{family}{SUFFIXES[kind][0] if kind == 'counter' else ''}" in readme, family
    for needle in ("prometheus.io/scheme", "metrics.serviceMonitor.enabled=true", "grafana.dashboards.enabled=true"):
        assert needle in readme, needle
    assert "Import" in readme  # without the sidecar: by hand, or through the HTTP API
    assert "api/dashboards/db" in readme
