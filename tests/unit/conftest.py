"""The unit folder's one marking rule: a test that builds a Keras-applications MobileNet is ``slow``.

Building one takes seconds of CPU (up to 30 s on a shared machine), so these run in ``make test``
but not in ``make test-unit``; the same code is covered there on small models. Tests that build
one whatever their parameters carry ``@pytest.mark.slow`` themselves (test_models,
test_transfer_learning) or are named here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parent
MOBILENETS = ("mobilenet_v2", "mobilenet_v3_small")
BUILD_MOBILENETS = {
    "test_dp_sgd.py": {
        "test_paths_follow_the_layer_registry",
        "test_batch_norm_statistics_stay_frozen_and_examples_stay_independent",
    },
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark MobileNet-building unit tests slow before ``-m`` selects (hence tryfirst)."""
    for item in items:
        if item.path.resolve().parent != UNIT_DIR:
            continue
        callspec = getattr(item, "callspec", None)
        parametrised = callspec is not None and any(name in callspec.id for name in MOBILENETS)
        named = item.originalname in BUILD_MOBILENETS.get(item.path.name, set())  # type: ignore[attr-defined]
        if parametrised or named:
            item.add_marker(pytest.mark.slow)
