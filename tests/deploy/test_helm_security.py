"""Hardening: locked-down containers, pinned images, secrets only ever as read-only files, and
NetworkPolicies.

The Helm chart is rendered without a cluster; see helm_support.py for how and what this cannot show.
"""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from tests.deploy.helm_support import (
    SECRET_NAME,
    by_kind,
    component,
    container,
    containers,
    deployment,
    enabled,
    env_of,
    mounted_files,
    plain_env,
    pod_specs,
    render,
    scenario_values,
    with_value,
    with_values,
)

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
