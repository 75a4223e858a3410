"""Fixtures for the Helm chart tests: the loaded chart and its renders, shared by every test_helm_*.py.

Session-scoped so that splitting the chart's tests over several files renders each variant once.
The rendered objects are only read, never changed, by the tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import helm_python as helm
import pytest

from tests.deploy.helm_support import CHART_DIR, SCENARIOS, TLS_VARIANTS, VARIANTS, render, scenario_values

Rendered = tuple[dict[str, Any], list[dict[str, Any]]]


@pytest.fixture(scope="session")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="session", params=SCENARIOS)
def scenario(request: pytest.FixtureRequest, chart: helm.Chart) -> Rendered:
    values = scenario_values(request.param)
    return values, render(chart, values)


@pytest.fixture(scope="session", params=VARIANTS, ids=[name for name, _ in VARIANTS])
def variant(request: pytest.FixtureRequest, chart: helm.Chart) -> Rendered:
    _, values = request.param
    return values, render(chart, values)


@pytest.fixture(scope="session", params=TLS_VARIANTS, ids=[name for name, _ in TLS_VARIANTS])
def tls_variant(request: pytest.FixtureRequest, chart: helm.Chart) -> Rendered:
    _, values = request.param
    return values, render(chart, values)
