"""The chart as a whole: scenario files, schema, lint, valid Kubernetes objects, names and the
environment each container gets loaded into the services' own settings classes.

The Helm chart is rendered without a cluster; see helm_support.py for how and what this cannot show.
"""

from __future__ import annotations

import os
import re
from typing import Any

import helm_python as helm
import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from aggregator.settings import AggregatorSettings
from client_agent.settings import AgentSettings
from keyserver.settings import KeyserverSettings
from tests.deploy.helm_support import (
    AGENT_ENV,
    AGGREGATOR_ENV,
    CERTIFICATE_SCHEMA,
    CHART_DIR,
    KEYSERVER_ENV,
    KEYSERVER_URL,
    KUBE_VERSION,
    NAMESPACE,
    PREFIX,
    RELEASE,
    REMOVED,
    SCENARIOS,
    SERVICE_MONITOR_SCHEMA,
    SETTINGS,
    by_kind,
    cert_manager,
    component,
    container,
    deployment,
    deployments,
    enabled,
    env_of,
    is_insecure,
    notes,
    render,
    scenario_values,
    with_value,
    with_values,
)

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
    # the app version itself: tests/deploy/test_version.py


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
