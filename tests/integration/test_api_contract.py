"""Schemathesis against both services' OpenAPI: no 5xx, and every answer is what the document says.

Each operation is exercised with generated requests (a fixed Hypothesis seed, a bounded number of
examples) as the services' admins, on a keyserver and an aggregator of their own (the generated
calls create and change things). The checks: no server error, every status code is one the
operation documents, every body matches its documented schema and content type.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, seed, settings
from schemathesis.checks import not_a_server_error
from schemathesis.pytest.lazy import LazySchema
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import Cluster, PostgresDatabases, running_cluster

EXAMPLES_PER_OPERATION = 12
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# The event stream never ends; it is covered by tests/integration/test_replicas.py.
SKIPPED = {("GET", "/v1/events")}


@pytest.fixture(scope="module")
def contract_cluster(postgres: PostgresDatabases, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(postgres, tmp_path_factory.mktemp("contract"), database_prefix="fedhe_contract") as started:
        yield started


def _schema(base_url: str, ca_file: Path) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json", verify=str(ca_file))


@pytest.fixture(scope="module")
def aggregator_schema(contract_cluster: Cluster) -> schemathesis.BaseSchema:
    return _schema(contract_cluster.aggregator_url, contract_cluster.secrets.ca_file)


@pytest.fixture(scope="module")
def keyserver_schema(contract_cluster: Cluster) -> schemathesis.BaseSchema:
    return _schema(contract_cluster.keyserver_url, contract_cluster.secrets.ca_file)


def _documented(fixture: str) -> LazySchema:
    """The operations of a schema fixture, less SKIPPED (left out of generation, not passed silently)."""
    schema = schemathesis.pytest.from_fixture(fixture)
    for method, path in SKIPPED:
        schema = schema.exclude(method=method, path=path)
    return schema


aggregator_api = _documented("aggregator_schema")
keyserver_api = _documented("keyserver_schema")


def _exercise(case: schemathesis.Case, base_url: str, token: str, ca_file: Path) -> None:
    assert (case.method.upper(), case.path) not in SKIPPED, "excluded operations are never generated"
    case.call_and_validate(
        base_url=base_url, headers={"Authorization": f"Bearer {token}"}, checks=CHECKS, verify=str(ca_file), timeout=60
    )


@aggregator_api.parametrize()
@seed(20261122)
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
def test_aggregator_answers_as_documented(case: schemathesis.Case, contract_cluster: Cluster) -> None:
    _exercise(
        case,
        contract_cluster.aggregator_url,
        contract_cluster.secrets.aggregator_admin_token,
        contract_cluster.secrets.ca_file,
    )


@keyserver_api.parametrize()
@seed(20261122)
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
def test_keyserver_answers_as_documented(case: schemathesis.Case, contract_cluster: Cluster) -> None:
    _exercise(
        case,
        contract_cluster.keyserver_url,
        contract_cluster.secrets.keyserver_admin_token,
        contract_cluster.secrets.ca_file,
    )
