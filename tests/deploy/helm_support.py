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

This module holds what the test_helm_*.py files share: rendering, values, constants and schemas.
The fixtures that render the chart (chart, scenario, variant, tls_variant) live in conftest.py.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml
from pydantic_settings import BaseSettings

from aggregator.settings import AggregatorSettings
from client_agent.settings import AgentSettings
from keyserver.settings import KeyserverSettings

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
    "FEDHE_KEYSERVER_HSTS_MAX_AGE_S",
    "FEDHE_KEYSERVER_KEY_RELEASES_PER_SITE",
    "FEDHE_KEYSERVER_MAX_BODY_BYTES",
    "FEDHE_KEYSERVER_RATE_LIMIT_PER_ADDRESS",
    "FEDHE_KEYSERVER_RATE_LIMIT_PER_CREDENTIAL",
    "FEDHE_KEYSERVER_AUTH_FAILURES_PER_ADDRESS",
    "FEDHE_KEYSERVER_REFUSAL_AUDITS_PER_MINUTE",
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
    "FEDHE_AGGREGATOR_HSTS_MAX_AGE_S",
    "FEDHE_AGGREGATOR_MAX_BODY_BYTES",
    "FEDHE_AGGREGATOR_MAX_UPLOAD_BYTES",
    "FEDHE_AGGREGATOR_RATE_LIMIT_PER_ADDRESS",
    "FEDHE_AGGREGATOR_RATE_LIMIT_PER_CREDENTIAL",
    "FEDHE_AGGREGATOR_AUTH_FAILURES_PER_ADDRESS",
    "FEDHE_AGGREGATOR_REFUSAL_AUDITS_PER_MINUTE",
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


TLS_VARIANTS = [(name, values) for name, values in VARIANTS if not values.get("tls", {}).get("insecureHttp")]


def enabled(values: dict[str, Any], name: str) -> bool:
    return bool(values.get(name, {}).get("enabled", True))


def is_insecure(values: dict[str, Any]) -> bool:
    return bool(values.get("tls", {}).get("insecureHttp", False))


def mutual(values: dict[str, Any], name: str) -> bool:
    return bool(values.get(name, {}).get("tls", {}).get("mutual", {}).get("enabled", False))


# ---- TLS, metrics and the dashboard -----------------------------------------------------------


def tls_secret(values: dict[str, Any], name: str) -> str:
    if values.get("tls", {}).get("certManager", {}).get("enabled"):
        return f"{RELEASE}-fedhe-{name}-tls"
    return str(values[name]["tls"]["existingSecret"])


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


def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded
