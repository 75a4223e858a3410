"""The Helm chart in deploy/helm/fedhe, checked without a cluster.

No Kubernetes cluster runs here (and there is no helm binary), so the chart is rendered and
schema-validated, not installed. helm-python-sdk renders and lints it with Helm's own Go
engine (the libhelm_c shared library shipped inside its wheel, loaded in-process through
ctypes; nothing is downloaded at run time). Every rendered manifest is then validated with
kubernetes-validate against the OpenAPI schemas of Kubernetes 1.30, in strict mode (unknown
fields are errors). Each scenario file in deploy/helm/fedhe/ci/ is rendered; the assertions
are about the values: hardening, pinned images, no secret material, probes, environment.

What this cannot show: that the images exist and start, that the Secrets named in the values
exist with the right keys, or that the cluster's CNI enforces the NetworkPolicies.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

pytestmark = pytest.mark.deploy

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "deploy" / "helm" / "fedhe"
SCENARIOS = sorted(p.name for p in (CHART_DIR / "ci").glob("*-values.yaml"))
KUBE_VERSION = "1.30.0"
RELEASE, NAMESPACE = "demo", "fedhe"

KEYSERVER_ENV = {
    "FEDHE_KEYSERVER_HOST",
    "FEDHE_KEYSERVER_PORT",
    "FEDHE_KEYSERVER_DATABASE_URL",
    "FEDHE_KEYSERVER_AGGREGATOR_URL",
    "FEDHE_KEYSERVER_KEK_FILE",
    "FEDHE_KEYSERVER_OPERATOR_TOKEN_FILE",
    "FEDHE_KEYSERVER_SERVICE_TOKEN_FILE",
    "FEDHE_KEYSERVER_LOG_LEVEL",
}
AGGREGATOR_ENV = {
    "FEDHE_AGGREGATOR_HOST",
    "FEDHE_AGGREGATOR_PORT",
    "FEDHE_AGGREGATOR_DATABASE_URL",
    "FEDHE_AGGREGATOR_KEYSERVER_URL",
    "FEDHE_AGGREGATOR_OPERATOR_TOKEN_FILE",
    "FEDHE_AGGREGATOR_SERVICE_TOKEN_FILE",
    "FEDHE_AGGREGATOR_MAX_UPLOAD_BYTES",
    "FEDHE_AGGREGATOR_LOG_LEVEL",
}  # plus FEDHE_AGGREGATOR_REDIS_URL whenever Redis is configured
AGENT_ENV = {
    "FEDHE_AGENT_AGGREGATOR_URL",
    "FEDHE_AGENT_KEYSERVER_URL",
    "FEDHE_AGENT_SITE_ID",
    "FEDHE_AGENT_CREDENTIAL_FILE",
    "FEDHE_AGENT_SIGNING_KEY_FILE",
    "FEDHE_AGENT_DATA_PATH",
    "FEDHE_AGENT_LABEL_COLUMN",
    "FEDHE_AGENT_STATE_DIR",
}  # plus FEDHE_AGENT_POLICY_FILE whenever the site has a policy

# Names whose plain value would be a secret (the *_FILE variables only carry a path).
SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|KEK|CREDENTIAL|SIGNING_KEY|PRIVATE_KEY|DATABASE_URL)$", re.I)


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


def with_value(values: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of values with one dotted key set."""
    result = copy.deepcopy(values)
    node = result
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return result


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def component(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["labels"]["app.kubernetes.io/component"])


def deployment(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    [found] = [d for d in by_kind(objects, "Deployment") if component(d) == name]
    return found


def pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(name, PodSpec) of every workload, the helm-test Pod included."""
    specs = [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in by_kind(objects, "Deployment")]
    specs += [(o["metadata"]["name"], o["spec"]) for o in by_kind(objects, "Pod")]
    return specs


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.fixture(scope="module", params=SCENARIOS)
def scenario(request: pytest.FixtureRequest, chart: helm.Chart) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    values = scenario_values(request.param)
    return values, render(chart, values)


# ---- the chart as a whole ---------------------------------------------------------------------


def test_scenario_files_exist() -> None:
    assert set(SCENARIOS) >= {"minimal-values.yaml", "production-values.yaml", "with-agents-values.yaml"}


def test_chart_metadata(chart: helm.Chart) -> None:
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "fedhe"
    assert meta["version"] == "0.1.0"
    assert meta["appVersion"] == "0.1.0"
    assert chart.values["image"]["tag"] == "0.1.0"


def test_schema_is_draft07_and_closed(chart: helm.Chart) -> None:
    schema = chart.schema
    assert schema is not None
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    assert {"keyserver", "aggregator"} <= set(schema["required"])
    with pytest.raises(helm.HelmValuesError, match="additional properties 'replicaCount' not allowed"):
        chart.validate_schema(with_value(scenario_values("minimal-values.yaml"), "replicaCount", 2))


@pytest.mark.parametrize("name", SCENARIOS)
def test_lint_is_clean(name: str) -> None:
    report = helm.lint(
        CHART_DIR, scenario_values(name), strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
    )
    assert report["errors"] == []
    findings = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert findings == []


def test_manifests_are_valid_kubernetes_objects(scenario: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    _, objects = scenario
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_expected_objects(scenario: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    values, objects = scenario
    services = {component(s): s for s in by_kind(objects, "Service")}
    assert services["keyserver"]["spec"]["ports"][0]["port"] == 8090
    assert services["aggregator"]["spec"]["ports"][0]["port"] == 8080
    for name, port in (("keyserver", 8090), ("aggregator", 8080)):
        [c] = deployment(objects, name)["spec"]["template"]["spec"]["containers"]
        assert c["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    agents = [d for d in by_kind(objects, "Deployment") if component(d) == "agent"]
    assert len(agents) == len(values.get("agents", []))
    for agent in agents:
        assert agent["spec"]["replicas"] == 1
        assert agent["spec"]["strategy"]["type"] == "Recreate"
    [test_pod] = by_kind(objects, "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert test_pod["spec"]["restartPolicy"] == "Never"


def test_aggregator_replicas_follow_values(scenario: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    values, objects = scenario
    expected = values.get("aggregator", {}).get("replicas", 1)
    assert deployment(objects, "aggregator")["spec"]["replicas"] == expected


def test_production_runs_two_aggregators_behind_a_budget() -> None:
    values = scenario_values("production-values.yaml")
    assert values["aggregator"]["replicas"] == 2
    with helm.Chart.load(CHART_DIR) as loaded:
        objects = render(loaded, values)
    [pdb] = by_kind(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    selector = deployment(objects, "aggregator")["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    env = env_of(deployment(objects, "aggregator")["spec"]["template"]["spec"]["containers"][0])
    assert env["FEDHE_AGGREGATOR_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "fedhe-aggregator-redis"


def test_replicas_are_configurable(chart: helm.Chart) -> None:
    values = with_value(scenario_values("minimal-values.yaml"), "aggregator.replicas", 3)
    values["aggregator"]["redis"] = {"existingSecret": "fedhe-redis"}
    assert deployment(render(chart, values), "aggregator")["spec"]["replicas"] == 3


def test_names_fit_in_dns_labels(chart: helm.Chart) -> None:
    """With the longest release name Helm allows (53) and a 40-character site, names stay unique and <= 63."""
    values = scenario_values("with-agents-values.yaml")
    values["agents"][0]["name"] = "s" * 40
    manifests = chart.render(values, name="r" * 53, namespace=NAMESPACE)
    names = [
        (doc["kind"], doc["metadata"]["name"])
        for path, text in manifests.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    assert len(set(names)) == len(names)
    assert all(len(name) <= 63 for _, name in names), names


# ---- hardening --------------------------------------------------------------------------------


def test_every_container_is_hardened(scenario: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    _, objects = scenario
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
        [c] = spec["containers"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["sizeLimit"]
        assert env_of(c)["TMPDIR"]["value"] == "/tmp"


def test_images_are_pinned(scenario: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    _, objects = scenario
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


def test_no_secret_material_is_rendered(scenario: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    _, objects = scenario
    assert by_kind(objects, "Secret") == []
    for cm in by_kind(objects, "ConfigMap"):
        assert set(cm["data"]) == {"policy.json"}  # only site privacy policies
    for name, spec in pod_specs(objects):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in containers(spec):
            mounts = {m["name"]: m for m in c.get("volumeMounts", [])}
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
            for mount_name, mount in mounts.items():
                if "secret" in volumes.get(mount_name, {}):
                    assert mount.get("readOnly") is True, f"{name}: secret volume {mount_name} is writable"


def test_secret_files_point_into_read_only_secret_mounts(scenario: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    _, objects = scenario
    for d in by_kind(objects, "Deployment"):
        spec = d["spec"]["template"]["spec"]
        [c] = spec["containers"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        secret_dirs = {
            m["mountPath"]: volumes[m["name"]]["secret"]
            for m in c["volumeMounts"]
            if "secret" in volumes[m["name"]] and m.get("readOnly")
        }
        for env in c["env"]:
            if env["name"].endswith("_FILE") and not env["name"].endswith("POLICY_FILE"):
                directory, _, filename = env["value"].rpartition("/")
                assert directory in secret_dirs, env
                assert filename in {i["path"] for i in secret_dirs[directory]["items"]}, env


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("keyserver.existingSecret", r"keyserver\.existingSecret is required.*kek, operator-token, service-token"),
        ("keyserver.database.existingSecret", r"keyserver\.database\.existingSecret is required"),
        ("aggregator.existingSecret", r"aggregator\.existingSecret is required.*operator-token, service-token"),
        ("aggregator.database.existingSecret", r"aggregator\.database\.existingSecret is required"),
    ],
)
def test_missing_existing_secret_fails_with_a_message(chart: helm.Chart, key: str, message: str) -> None:
    values = with_value(scenario_values("minimal-values.yaml"), key, "")
    with pytest.raises(helm.HelmRenderError, match=message):
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
        [{"name": "FEDHE_AGGREGATOR_SERVICE_TOKEN", "value": "not-a-real-token"}],
    )
    with pytest.raises(helm.HelmRenderError, match="FEDHE_AGGREGATOR_SERVICE_TOKEN has a plain value"):
        render(chart, values)


def test_redis_url_with_password_is_refused(chart: helm.Chart) -> None:
    values = with_value(scenario_values("minimal-values.yaml"), "aggregator.redis", {"url": "redis://:pw@redis:6379/0"})
    with pytest.raises(helm.HelmError):
        render(chart, values)


def test_several_aggregators_need_redis(chart: helm.Chart) -> None:
    values = with_value(scenario_values("minimal-values.yaml"), "aggregator.replicas", 2)
    with pytest.raises(helm.HelmRenderError, match="needs a shared Redis"):
        render(chart, values)


# ---- configuration ----------------------------------------------------------------------------


def test_environment_variable_names(scenario: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    values, objects = scenario
    ks = env_of(deployment(objects, "keyserver")["spec"]["template"]["spec"]["containers"][0])
    assert set(ks) >= KEYSERVER_ENV
    assert ks["FEDHE_KEYSERVER_HOST"]["value"] == "0.0.0.0"
    assert ks["FEDHE_KEYSERVER_PORT"]["value"] == "8090"

    ag = env_of(deployment(objects, "aggregator")["spec"]["template"]["spec"]["containers"][0])
    redis = values["aggregator"].get("redis", {})
    assert set(ag) >= AGGREGATOR_ENV | ({"FEDHE_AGGREGATOR_REDIS_URL"} if redis else set())
    assert ("FEDHE_AGGREGATOR_REDIS_URL" in ag) == bool(redis)
    assert ag["FEDHE_AGGREGATOR_PORT"]["value"] == "8080"
    assert int(ag["FEDHE_AGGREGATOR_MAX_UPLOAD_BYTES"]["value"]) > 0
    assert ag["FEDHE_AGGREGATOR_KEYSERVER_URL"]["value"] == f"http://{RELEASE}-fedhe-keyserver:8090"
    assert ks["FEDHE_KEYSERVER_AGGREGATOR_URL"]["value"] == f"http://{RELEASE}-fedhe-aggregator:8080"

    for d in by_kind(objects, "Deployment"):
        if component(d) != "agent":
            continue
        agent = env_of(d["spec"]["template"]["spec"]["containers"][0])
        assert set(agent) >= AGENT_ENV
        assert "FEDHE_AGENT_POLICY_FILE" in agent  # both scenario sites have a policy


def test_agent_state_survives_restarts() -> None:
    values = scenario_values("with-agents-values.yaml")
    with helm.Chart.load(CHART_DIR) as loaded:
        objects = render(loaded, values)
    claims = {c["metadata"]["name"]: c for c in by_kind(objects, "PersistentVolumeClaim")}
    assert claims[f"{RELEASE}-fedhe-agent-site-a-state"]["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert f"{RELEASE}-fedhe-agent-site-b-state" not in claims  # site-b brings its own claim
    for d in by_kind(objects, "Deployment"):
        if component(d) == "agent":
            volumes = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
            assert "persistentVolumeClaim" in volumes["state"]


def test_probes(scenario: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    _, objects = scenario
    for name in ("keyserver", "aggregator"):
        [c] = deployment(objects, name)["spec"]["template"]["spec"]["containers"]
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert c["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_connection_test_hits_both_healthz(scenario: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    _, objects = scenario
    [pod] = by_kind(objects, "Pod")
    [c] = pod["spec"]["containers"]
    env = env_of(c)
    assert env["KEYSERVER_URL"]["value"] == f"http://{RELEASE}-fedhe-keyserver:8090"
    assert env["AGGREGATOR_URL"]["value"] == f"http://{RELEASE}-fedhe-aggregator:8080"
    assert "$KEYSERVER_URL/healthz" in c["args"][0]
    assert "$AGGREGATOR_URL/healthz" in c["args"][0]


def test_network_policies(chart: helm.Chart) -> None:
    open_objects = render(chart, scenario_values("minimal-values.yaml"))
    policies = {component(p): p for p in by_kind(open_objects, "NetworkPolicy")}
    assert set(policies) == {"keyserver", "aggregator"}
    assert policies["keyserver"]["spec"]["ingress"][0]["from"] == [{"podSelector": {}}]
    assert policies["keyserver"]["spec"]["ingress"][0]["ports"] == [{"port": 8090, "protocol": "TCP"}]

    restricted = render(chart, scenario_values("production-values.yaml"))
    policies = {component(p): p for p in by_kind(restricted, "NetworkPolicy")}
    peers = policies["keyserver"]["spec"]["ingress"][0]["from"]
    allowed = {p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in peers if "podSelector" in p}
    assert allowed == {"aggregator", "agent", "test"}
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}} in peers
    assert {"podSelector": {}} not in peers

    disabled = render(chart, with_value(scenario_values("minimal-values.yaml"), "networkPolicy.enabled", False))
    assert by_kind(disabled, "NetworkPolicy") == []


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
