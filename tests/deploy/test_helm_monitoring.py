"""Metrics, ServiceMonitors and the Grafana dashboard: the dashboard's PromQL is checked against
the metrics the services' own registries export.

The Helm chart is rendered without a cluster; see helm_support.py for how and what this cannot show.
"""

from __future__ import annotations

import json
import re
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from aggregator.metrics import Metrics
from keyserver.metrics import KeyserverMetrics
from tests.deploy.helm_support import (
    DASHBOARD_FILE,
    EXPORTED,
    GRAFANA_BUILTINS,
    KUBE_VERSION,
    NAMESPACE,
    PROMQL_FUNCTIONS,
    PROMQL_KEYWORDS,
    RELEASE,
    SAMPLES,
    TARGET_LABELS,
    by_kind,
    cert_manager,
    component,
    container,
    dashboard,
    deployment,
    deployments,
    enabled,
    is_insecure,
    mutual,
    render,
    scenario_values,
    tls_secret,
    with_value,
    with_values,
)

# ---- metrics, ServiceMonitors and the Grafana dashboard ----------------------------------------


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
