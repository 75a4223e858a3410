"""The secret randomness of one DP-SGD run, and the one switch that makes it reproducible in tests.

DP-SGD's guarantee holds only against someone who cannot regenerate its Gaussian noise (or
know which examples each step sampled). So every training run draws fresh secrets from the
operating system's CSPRNG: 192 bits for the noise generator's state (three 64-bit words) and
128 bits for the batch sampler's seed. Nothing else feeds them; they are never logged, stored
or sent, and their holder prints no value (``repr`` is the object's address).

Tests need the same noise twice, so ``FEDHE_INSECURE_DP_SEED=test-only:<int>`` derives both
from that integer and the run's name (its site, job and round, so runs stay independent), the
way ``FEDHE_INSECURE_PLAINTEXT_CODEC=benchmark-only`` unlocks the plaintext codec: no
deployment sets it, and any other value is refused (a typo must not silently fall back to
either behaviour).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import secrets
from dataclasses import dataclass

import numpy as np

from fedhe.errors import InvalidRequest

SWITCH = "FEDHE_INSECURE_DP_SEED"
_TEST_VALUE = re.compile(r"test-only:(\d{1,30})")

logger = logging.getLogger("fedhe.dp")


@dataclass(frozen=True, repr=False, eq=False)
class RunSecrets:
    """Seeds of one run's noise (Philox state: counter words then key) and batch sampling."""

    noise_state: tuple[int, int, int]
    sampling_seed: int
    reproducible: bool


def _from_test_seed(seed: int, stream: str) -> RunSecrets:
    def words(purpose: bytes, count: int) -> list[int]:
        digest = hashlib.sha256(purpose + seed.to_bytes(16, "big") + stream.encode()).digest()
        return [int.from_bytes(digest[8 * i : 8 * i + 8], "big") for i in range(count)]

    noise = words(b"fedhe-dp-noise", 3)
    sampling = words(b"fedhe-dp-sampling", 2)
    return RunSecrets((noise[0], noise[1], noise[2]), (sampling[0] << 64) | sampling[1], reproducible=True)


def draw_run_secrets(test_stream: str = "") -> RunSecrets:
    """Fresh OS entropy for one training run, or the test seed when the switch says so.

    ``test_stream`` names the run under the test switch only (a site, job and round): each
    stream gets its own reproducible noise, as independent runs would in a deployment. Without
    it every run of a test would draw the same noise, perfectly correlated across sites and
    rounds, which no real federation sees. Without the switch it is ignored.
    """
    value = os.environ.get(SWITCH)
    if value is None:
        state = tuple(int.from_bytes(os.urandom(8), "big") for _ in range(3))
        return RunSecrets((state[0], state[1], state[2]), secrets.randbits(128), reproducible=False)
    match = _TEST_VALUE.fullmatch(value)
    if match is None:
        raise InvalidRequest(
            f"{SWITCH} is set but is not 'test-only:<integer>'; unset it (DP noise must come from OS entropy)",
            code="insecure_dp_seed_refused",
        )
    _warn_reproducible()
    return _from_test_seed(int(match.group(1)), test_stream)


def noise_generator(test_stream: str = "") -> np.random.Generator:
    """A NumPy generator for Gaussian noise outside DP-SGD (the statistics step): 192 bits of OS
    entropy, or the test seed's stream under the switch (``draw_run_secrets``)."""
    return np.random.default_rng(np.random.SeedSequence(list(draw_run_secrets(test_stream).noise_state)))


@functools.cache
def _warn_reproducible() -> None:
    """Once per process: a test run trains many times."""
    logger.warning("DP-SGD noise and sampling are reproducible (%s is set): for tests only", SWITCH)
