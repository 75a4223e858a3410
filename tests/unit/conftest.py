"""The unit folder's marking rules: what takes seconds of CPU per test is ``slow``.

``make test`` runs every test; ``make test-unit`` (``-m "not ... and not slow"``) leaves these out
so the fast tier stays under a minute:

- a test that builds a Keras-applications MobileNet (seconds each, up to 30 s on a shared machine),
  by its parameter id here, or by ``@pytest.mark.slow`` where it builds one whatever its
  parameters (test_models, test_transfer_learning);
- the files in ``SLOW_FILES``, each for the reason given.
"""

from __future__ import annotations

from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parent
MOBILENETS = ("mobilenet_v2", "mobilenet_v3_small")
SLOW_FILES = {
    # DP-SGD steps traced with tf.function on real Keras models: 1-2 s each, 20 s or more in all.
    "test_dp_sgd.py",
    # A fresh interpreter per role, importing that role's packages only: 4-5 s each.
    "test_roles.py",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the slow unit tests before ``-m`` selects (hence tryfirst)."""
    for item in items:
        if item.path.resolve().parent != UNIT_DIR:
            continue
        callspec = getattr(item, "callspec", None)
        builds_a_mobilenet = callspec is not None and any(name in callspec.id for name in MOBILENETS)
        if builds_a_mobilenet or item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
