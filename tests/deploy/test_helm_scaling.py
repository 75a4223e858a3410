"""Replicas, Redis (required by several aggregators, its key prefix) and split installs (keyserver
owner and coordinator each install only their own service).

The Helm chart is rendered without a cluster; see helm_support.py for how and what this cannot show.
"""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from tests.deploy.helm_support import (
    KEYSERVER_URL,
    by_kind,
    component,
    container,
    deployment,
    deployments,
    enabled,
    env_of,
    mounted_files,
    plain_env,
    render,
    scenario_values,
    with_value,
    with_values,
)


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
