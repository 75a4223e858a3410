"""The dashboard's assets: its own files and the vendored chart library, served from the package.

The chart library (uPlot) lives under ``dashboard_static/vendor/uplot-<version>/`` with its licence
and a README naming its version and source; the pages load exactly that version; only scripts,
style sheets and icons are served, each with the dashboard's Content-Security-Policy, and nothing
outside the static folder. tests/browser/test_dashboard.py loads every page with the network
blocked but for the aggregator.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from aggregator import dashboard
from aggregator.dashboard import ASSETS, SECURITY_HEADERS, STATIC, router
from fedhe.errors import FedheError

VENDOR = STATIC / "vendor"


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    app.include_router(router)

    @app.exception_handler(FedheError)
    def refused(request: Request, exc: FedheError) -> JSONResponse:
        return JSONResponse({"error": exc.code}, status_code=exc.status_code)

    return TestClient(app)


def test_the_chart_library_is_vendored_with_its_version_licence_and_source() -> None:
    (library,) = VENDOR.iterdir()
    version = re.fullmatch(r"uplot-(\d+\.\d+\.\d+)", library.name)
    assert version is not None, library.name
    assert sorted(p.name for p in library.iterdir()) == ["LICENSE", "README.md", "uPlot.esm.js", "uPlot.min.css"]
    assert (library / "LICENSE").read_text(encoding="utf-8").startswith("The MIT License (MIT)")
    readme = (library / "README.md").read_text(encoding="utf-8")
    assert f"uPlot {version[1]}" in readme
    assert f"npm pack uplot@{version[1]}" in readme
    assert f"https://registry.npmjs.org/uplot/-/uplot-{version[1]}.tgz" in readme
    # The pages load this version and no other chart library.
    charts = (STATIC / "charts.js").read_text(encoding="utf-8")
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    assert f'"./vendor/{library.name}/uPlot.esm.js"' in charts
    assert f'href="/dashboard/assets/vendor/{library.name}/uPlot.min.css"' in page
    for source in [charts, page, *(p.read_text(encoding="utf-8") for p in STATIC.glob("*.js"))]:
        assert "plotly" not in source.lower()


def test_no_module_imports_plotly_any_more() -> None:
    root = Path(dashboard.__file__).resolve().parents[3]
    sources = [*root.glob("services/*/*/**/*.py"), *root.glob("shared/fedhe/**/*.py")]
    assert len(sources) > 50
    assert [p for p in sources if re.search(r"^\s*(import|from) plotly", p.read_text(encoding="utf-8"), re.M)] == []


@pytest.mark.parametrize(
    ("name", "media_type"),
    [
        ("app.js", "text/javascript"),
        ("charts.js", "text/javascript"),
        ("style.css", "text/css"),
        ("icon.svg", "image/svg+xml"),
        ("vendor/uplot-1.6.32/uPlot.esm.js", "text/javascript"),
        ("vendor/uplot-1.6.32/uPlot.min.css", "text/css"),
    ],
)
def test_assets_are_served_with_their_type_and_the_dashboards_headers(
    client: TestClient, name: str, media_type: str
) -> None:
    assert name in ASSETS
    response = client.get(f"/dashboard/assets/{name}")
    assert response.status_code == 200
    assert response.headers["Content-Type"].split(";")[0] == media_type
    assert response.content == (STATIC / name).read_bytes()
    for header, value in SECURITY_HEADERS.items():
        assert response.headers[header] == value


def test_the_policy_allows_this_origin_only_and_no_inline_style_or_script() -> None:
    policy = dict(part.strip().split(" ", 1) for part in SECURITY_HEADERS["Content-Security-Policy"].split(";"))
    assert policy["default-src"] == "'none'"
    for directive in ("script-src", "style-src", "img-src", "connect-src", "font-src"):
        assert policy[directive] == "'self'", directive
    assert policy["frame-ancestors"] == "'none'"


@pytest.mark.parametrize(
    "name",
    [
        "plotly.min.js",
        "vendor/uplot-1.6.32/LICENSE",
        "vendor/uplot-1.6.32/README.md",
        "vendor/uplot-1.6.32",
        "vendor",
        "index.html",
        "../dashboard.py",
        "..%2Fdashboard.py",
        "vendor/../../dashboard.py",
        "/etc/passwd",
        "no-such.js",
    ],
)
def test_anything_else_is_not_found(client: TestClient, name: str) -> None:
    assert client.get(f"/dashboard/assets/{name}").status_code == 404
