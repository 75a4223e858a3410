"""The chart's documentation: every value documented, the README covering each TLS mode, the
split install and every dashboard panel.

The Helm chart is rendered without a cluster; see helm_support.py for how and what this cannot show.
"""

from __future__ import annotations

import re

from tests.deploy.helm_support import (
    CHART_DIR,
    EXPORTED,
    REMOVED,
    SUFFIXES,
    dashboard,
)

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
