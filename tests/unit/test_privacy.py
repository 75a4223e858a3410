"""Privacy accounting, the site policy and the on-disk ledger."""

from __future__ import annotations

from pathlib import Path

import pytest

from client_agent.ledger import LedgerEntry, PrivacyLedger
from client_agent.policy import SitePolicy, load_policy
from fedhe.errors import InvalidRequest
from fedhe.privacy import DPSettings, TrainingPass, epsilon_spent

ROUND = TrainingPass(sampling_probability=0.1, noise_multiplier=1.1, steps=30)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    one, five = epsilon_spent([ROUND], 1e-5), epsilon_spent([ROUND] * 5, 1e-5)
    assert 0 < one < five
    noisier = TrainingPass(sampling_probability=0.1, noise_multiplier=2.0, steps=30)
    assert epsilon_spent([noisier] * 5, 1e-5) < five
    assert epsilon_spent([], 1e-5) == 0.0


def test_epsilon_matches_known_value() -> None:
    # tensorflow-privacy's tutorial setting: q=256/60000, sigma=1.1, 60 epochs, delta=1e-5 -> eps ~3.0
    steps = 60 * 60000 // 256
    eps = epsilon_spent([TrainingPass(sampling_probability=256 / 60000, noise_multiplier=1.1, steps=steps)], 1e-5)
    assert 2.5 < eps < 3.3


def test_policy_tightens_and_never_loosens() -> None:
    job = DPSettings(l2_norm_clip=1.5, noise_multiplier=0.8, delta=1e-5)
    tightened = SitePolicy(max_l2_norm_clip=1.0, min_noise_multiplier=1.2, max_delta=1e-6).tighten(job)
    assert (tightened.l2_norm_clip, tightened.noise_multiplier, tightened.delta) == (1.0, 1.2, 1e-6)
    loose = SitePolicy(max_l2_norm_clip=5.0, min_noise_multiplier=0.5, max_delta=1e-3).tighten(job)
    assert (loose.l2_norm_clip, loose.noise_multiplier, loose.delta) == (1.5, 0.8, 1e-5)


def test_policy_file_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "policy.json"
    bad.write_text('{"max_epsilon": -1}')
    with pytest.raises(InvalidRequest, match="not valid"):
        load_policy(bad)
    assert load_policy(None) == SitePolicy()


def test_ledger_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path)
    for r in range(3):
        ledger.record(LedgerEntry(job_id="j", round=r, attempt=1, training=ROUND))
    reopened = PrivacyLedger(path)
    assert len(reopened.entries()) == 3
    assert reopened.epsilon(1e-5) == pytest.approx(epsilon_spent([ROUND] * 3, 1e-5))
    assert reopened.epsilon(1e-5, extra=ROUND) == pytest.approx(epsilon_spent([ROUND] * 4, 1e-5))
