"""The versions every site and the aggregator must share, read without importing them.

Mismatched TensorFlow versions silently change optimiser defaults and break convergence; a
different tensorflow-privacy or TenSEAL changes the mechanism or the ciphertext format. The
aggregator records its own environment in each job; a site compares before it trains (and
declines a round rather than spend privacy budget on an update that would be refused), and the
aggregator refuses an upload from a different one, naming the difference.
"""

from __future__ import annotations

import platform
from importlib.metadata import version

import fedhe
from fedhe.schemas import Environment


def current() -> Environment:
    """This process's versions of Python, TensorFlow, tensorflow-privacy, TenSEAL and fedhe."""
    return Environment(
        python=platform.python_version(),
        tensorflow=version("tensorflow"),
        tensorflow_privacy=version("tensorflow-privacy"),
        tenseal=version("tenseal"),
        fedhe=fedhe.__version__,
    )


def differences(expected: Environment, actual: Environment) -> list[str]:
    """Each component that differs, as 'name: expected X, got Y'."""
    wanted, got = expected.model_dump(), actual.model_dump()
    return [f"{name}: job has {wanted[name]}, site has {got[name]}" for name in wanted if wanted[name] != got[name]]
