"""Privacy accounting, the site policy and the on-disk ledger."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from client_agent.ledger import LedgerEntry, PrivacyLedger
from client_agent.policy import SitePolicy, load_policy
from fedhe.errors import InvalidRequest
from fedhe.privacy import (
    DPSettings,
    TrainingPass,
    epsilon_spent,
    epsilon_spent_rdp,
    local_training_pass,
    plan_epsilon,
)

ROUND = TrainingPass(sampling_probability=0.1, noise_multiplier=1.1, steps=30)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    one, five = epsilon_spent([ROUND], 1e-5), epsilon_spent([ROUND] * 5, 1e-5)
    assert 0 < one < five
    noisier = TrainingPass(sampling_probability=0.1, noise_multiplier=2.0, steps=30)
    assert epsilon_spent([noisier] * 5, 1e-5) < five
    assert epsilon_spent([], 1e-5) == 0.0


def _analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact ε of one Gaussian mechanism (sensitivity 1, std σ) at δ (Balle & Wang 2018, Thm 8)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    def delta_of(eps: float) -> float:
        return float(norm.cdf(0.5 / sigma - eps * sigma) - np.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma))

    return float(brentq(lambda eps: delta_of(eps) - delta, 0.0, 100.0))


@pytest.mark.parametrize("sigma", [0.8, 1.0, 2.0])
def test_pld_is_tight_on_a_single_gaussian_mechanism(sigma: float) -> None:
    exact = _analytic_gaussian_epsilon(sigma, 1e-5)
    pld = epsilon_spent([TrainingPass(sampling_probability=1.0, noise_multiplier=sigma, steps=1)], 1e-5)
    assert exact <= pld <= exact * 1.01


@pytest.mark.parametrize(
    ("q", "sigma", "steps"), [(256 / 60000, 1.1, 60 * 60000 // 256), (0.2, 1.5, 25), (0.05, 0.8, 400)]
)
def test_pld_is_below_rdp_and_both_are_sane(q: float, sigma: float, steps: int) -> None:
    passes = [TrainingPass(sampling_probability=q, noise_multiplier=sigma, steps=steps)]
    pld, rdp = epsilon_spent(passes, 1e-5), epsilon_spent_rdp(passes, 1e-5)
    assert 0 < pld <= rdp < 1.3 * pld


def test_epsilon_matches_the_tensorflow_privacy_tutorial() -> None:
    # q=256/60000, sigma=1.1, 60 epochs, delta=1e-5: RDP gives ~2.6 (the tutorial's "about 3"), PLD ~2.4.
    passes = [TrainingPass(sampling_probability=256 / 60000, noise_multiplier=1.1, steps=60 * 60000 // 256)]
    assert epsilon_spent_rdp(passes, 1e-5) == pytest.approx(2.6, abs=0.05)
    assert epsilon_spent(passes, 1e-5) == pytest.approx(2.38, abs=0.05)


def test_composition_does_not_depend_on_how_passes_are_split() -> None:
    a = TrainingPass(sampling_probability=0.1, noise_multiplier=1.1, steps=10)
    b = TrainingPass(sampling_probability=0.2, noise_multiplier=1.5, steps=5)
    merged = [a.model_copy(update={"steps": 30}), b.model_copy(update={"steps": 10})]
    assert epsilon_spent([a, b, a, b, a], 1e-5) == pytest.approx(epsilon_spent(merged, 1e-5))


def test_plan_gives_epsilon_after_every_round_as_the_ledger_will_count_it() -> None:
    plan = plan_epsilon(num_samples=150, batch_size=32, noise_multiplier=1.5, local_epochs=2, rounds=4, delta=1e-5)
    assert len(plan) == 4
    assert all(earlier < later for earlier, later in itertools.pairwise(plan))
    one_round = local_training_pass(num_samples=150, batch_size=32, epochs=2, noise_multiplier=1.5)
    assert one_round.steps == 2 * 5
    assert one_round.sampling_probability == pytest.approx(32 / 150)
    for rounds, eps in enumerate(plan, start=1):
        assert eps == pytest.approx(epsilon_spent([one_round] * rounds, 1e-5))


def test_plan_refuses_a_site_smaller_than_one_batch() -> None:
    with pytest.raises(InvalidRequest, match="fewer than one batch"):
        plan_epsilon(num_samples=10, batch_size=32, noise_multiplier=1.0, local_epochs=1, rounds=1, delta=1e-5)


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


def test_the_privacy_plan_command_prints_the_plan_the_aggregator_stores(tmp_path, capsys) -> None:
    from fedhe.cli.main import EXIT_INVALID_INPUT, main

    spec = {
        "name": "planned",
        "key_id": "key-" + "0" * 32,
        "model": {"input_dim": 30, "num_classes": 2},
        "rounds": 4,
        "batch_size": 16,
        "dp": {"noise_multiplier": 1.0, "delta": 1e-5},
        "epsilon_warning": 5.0,
    }
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    assert main(["privacy", "plan", str(path), "--samples", "120", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = plan_epsilon(num_samples=120, batch_size=16, noise_multiplier=1.0, local_epochs=1, rounds=4, delta=1e-5)
    assert printed["epsilon_per_round"] == pytest.approx(expected)
    assert (expected[-1] > 5.0) == any("epsilon_warning=5" in w for w in printed["warnings"])
    assert printed["upload"]["bytes_per_parameter"] == pytest.approx(3.76, abs=0.01)
    assert printed["upload"]["upload_bytes"] == 61_606  # 62 values: one ciphertext
    assert main(["privacy", "plan", str(path), "--samples", "120"]) == 0
    assert "upload: 16-bit packing (R=1, max_sites=128) costs 3.76 bytes per parameter" in capsys.readouterr().out
    assert main(["privacy", "plan", str(path)]) == EXIT_INVALID_INPUT
    assert "give --samples or set min_site_samples" in capsys.readouterr().err
    path.write_text(json.dumps({**spec, "rounds": 0}))
    assert main(["privacy", "plan", str(path), "--samples", "120"]) == EXIT_INVALID_INPUT
    assert f"{path}: rounds:" in capsys.readouterr().err
