"""Job options without services: validation, the statistics vector, and how sites are sampled."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from aggregator.sampling import SiteSampler
from client_agent.normalisation import StatisticsNoise, normalisation_from_sum, statistics_upload
from fedhe.db import utcnow
from fedhe.errors import InvalidRequest
from fedhe.he import PACKED_FORMAT_ID, PackingSettings
from fedhe.he.packing import bytes_per_value
from fedhe.job_options import SamplingMode, SamplingSettings
from fedhe.job_planning import creation_warnings, privacy_plan, upload_cost
from fedhe.modelspec import ModelSpec
from fedhe.privacy import epsilon_spent, local_training_pass
from fedhe.schemas import JobCreate, SiteStatus

KEY = "key-" + "0" * 32
FIXED_NORMALISATION = {"input_dim": 3, "num_classes": 2, "normalisation": {"mean": [0, 0, 0], "std": [1, 1, 1]}}


def _job(**fields: Any) -> JobCreate:
    return JobCreate.model_validate({"name": "j", "key_id": KEY, "model": {"input_dim": 3, "num_classes": 2}, **fields})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"algorithm": {"name": "fedprox"}}, "fedprox needs proximal_mu > 0"),
        ({"algorithm": {"proximal_mu": 0.1}}, "proximal_mu applies to fedprox only"),
        ({"min_sites": 3, "sampling": {"mode": "fraction", "fraction": 0.5, "min_sites": 2}}, "sampling.min_sites"),
        ({"statistics": {"feature_bounds": [1.0, 2.0]}}, "one bound per input feature"),
        ({"statistics": {"feature_bounds": [1.0, 0.0, 2.0]}}, "positive and finite"),
        ({"statistics": {"feature_bounds": [1, 1, 1]}, "model": FIXED_NORMALISATION}, "not both"),
        ({"public_test_set": {"x": [[1.0, 2.0]], "y": [0]}}, "must hold 3 values"),
        ({"public_test_set": {"x": [[1.0, 2.0, 3.0]], "y": [2]}}, "class indices 0..1"),
        ({"format_id": "ckks-seeded-last-v2", "packing": {"clip_range": 1.0}}, "apply only to format"),
        ({"min_sites": 200, "format_id": PACKED_FORMAT_ID, "packing": {"clip_range": 1.0}}, "max_sites"),
        ({"min_sites": 2}, "min_sites=2 leaves secure aggregation's promise empty"),
        ({"min_sites": 4, "secure_aggregation": {"threshold": 4}}, r"at least t \+ 1 = 5 uploads"),
        ({"secure_aggregation": {"threshold": 1}}, "greater than or equal to 2"),
        ({"format_id": "ckks-seeded-last-v2"}, "secure aggregation needs format bfv-packed-v1"),
        ({"statistics": {"feature_bounds": [1, 1, 1], "noise_multiplier": 0.1}}, "greater than or equal to 0.5"),
        (
            {"min_site_samples": 116, "dp": {"delta": 0.05}},
            r"dp.delta=0.05 is not below 1/n = 0.00862 for a site of min_site_samples=116 rows",
        ),
        (
            {"min_site_samples": 116, "max_site_samples": 50_000, "dp": {"delta": 1e-4}},
            r"dp.delta=0.0001 is not below 1/n = 2e-05 for a site of max_site_samples=50000 rows",
        ),
        ({"min_site_samples": 100, "max_site_samples": 50}, "max_site_samples=50 is below min_site_samples=100"),
        ({"max_site_samples": 200_000}, "max_site_samples=200000 is over max_samples_per_round=100000"),
    ],
)
def test_job_settings_that_cannot_work_are_refused_naming_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _job(**fields)


def test_the_packed_format_gets_default_packing_and_the_statistics_step_its_own() -> None:
    job = _job(format_id=PACKED_FORMAT_ID, min_sites=150, statistics={"feature_bounds": [1, 2, 3]}, rounds=4)
    assert job.packing == PackingSettings(clip_range=1.0, bits=16, max_sites=150)
    assert job.total_rounds == 5
    assert job.round_packing(0) == PackingSettings(clip_range=1.0, bits=36, max_sites=150)
    assert job.round_packing(1) == job.packing
    assert (job.round_num_values(0), job.round_num_values(1)) == (6, 8)  # 3 × 2 + 2 parameters
    assert not _job().is_statistics_round(0)


@pytest.mark.parametrize(("min_sites", "threshold"), [(3, 2), (5, 2), (6, 3), (40, 20)])
def test_secure_aggregation_is_on_by_default_with_half_of_min_sites_as_threshold(
    min_sites: int, threshold: int
) -> None:
    job = _job(min_sites=min_sites, packing={"clip_range": 1.0, "max_sites": max(128, min_sites)})
    assert job.threshold == threshold
    assert job.secure_aggregation is not None
    assert job.secure_aggregation.phase_deadline_s == 300


def test_a_job_without_secure_aggregation_says_so_and_may_run_with_fewer_sites() -> None:
    job = _job(min_sites=1, secure_aggregation=None)
    assert job.threshold is None


def test_sampling_counts_a_fraction_with_a_minimum() -> None:
    settings = SamplingSettings(mode=SamplingMode.FRACTION, fraction=0.3, min_sites=2)
    assert [settings.count(n) for n in (1, 2, 5, 10, 100)] == [1, 2, 2, 3, 30]


def test_without_noise_the_statistics_vector_stays_in_range_and_gives_back_the_pooled_mean_and_std() -> None:
    rng = np.random.default_rng(0)
    sites = [rng.normal([5.0, -20.0], [2.0, 7.0], size=(n, 2)) for n in (40, 250, 90)]
    bounds = [20.0, 80.0]
    vectors = []
    for x in sites:
        vector, clipped = statistics_upload(x, bounds, weight_scale=300, clip_norm=2.0, noise_multiplier=0.0, rng=rng)
        assert clipped == {"clipped_fraction": 0.0, "rows_clipped_fraction": 0.0}
        assert np.all(np.abs(vector) <= 1.0)
        vectors.append(vector)
    noise = StatisticsNoise(num_inputs=3, noise_multiplier=0.0, clip_norm=2.0)
    pooled = normalisation_from_sum(np.sum(vectors, axis=0), bounds, 380, 300, noise)
    everything = np.concatenate(sites)
    np.testing.assert_allclose(pooled.mean, everything.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(pooled.std, everything.std(axis=0), rtol=1e-9)


def test_the_statistics_noise_is_gaussian_at_sigma_times_the_clip_norm_over_s() -> None:
    x = np.full((50, 3), 2.0)
    draws = np.stack(
        [
            statistics_upload(x, [4.0] * 3, 100, clip_norm=1.5, noise_multiplier=2.0, rng=np.random.default_rng(i))[0]
            for i in range(2000)
        ]
    )
    exact = statistics_upload(x, [4.0] * 3, 100, clip_norm=1.5, noise_multiplier=0.0, rng=np.random.default_rng(0))[0]
    np.testing.assert_allclose(draws.mean(axis=0), exact, atol=4 * 0.03 / np.sqrt(2000))
    np.testing.assert_allclose(draws.std(axis=0), 2.0 * 1.5 / 100, rtol=0.05)


def test_rows_longer_than_the_clip_norm_are_scaled_down_and_counted() -> None:
    x = np.array([[1.0, 1.0], [0.1, 0.0], [1.0, 0.0], [0.0, 0.0]])
    vector, clipped = statistics_upload(
        x, [1.0, 1.0], 1, clip_norm=1.0, noise_multiplier=0.0, rng=np.random.default_rng(0)
    )
    # Row 0 has norm 2 (z = 1, 1 and z² = 1, 1), row 2 norm sqrt(2): both halve or shrink to norm 1.
    assert clipped == {"clipped_fraction": 0.0, "rows_clipped_fraction": 0.5}
    np.testing.assert_allclose(vector, [0.5 + 0.1 + 2**-0.5, 0.5, 0.5 + 0.01 + 2**-0.5, 0.5])


def test_a_variance_below_the_noise_level_is_raised_to_it() -> None:
    noise = StatisticsNoise(num_inputs=4, noise_multiplier=2.0, clip_norm=1.0)
    # Mean 0 and a noisy negative mean square: the estimate cannot tell that variance from zero.
    pooled = normalisation_from_sum(np.array([0.0, -0.5]), [10.0], 400, 100, noise)
    floor = 2.0 * 1.0 * np.sqrt(4) / 400
    assert pooled.std == pytest.approx([np.sqrt(floor) * 10.0])


def test_image_statistics_are_per_channel_and_values_beyond_the_bound_are_clipped_and_counted() -> None:
    images = np.zeros((4, 2, 2, 3))
    images[..., 0] = 100.0
    images[0, 0, 0, 2] = 999.0
    rng = np.random.default_rng(0)
    vector, clipped = statistics_upload(images, [255.0] * 3, 4, clip_norm=10.0, noise_multiplier=0.0, rng=rng)
    assert clipped == {"clipped_fraction": pytest.approx(1 / 48), "rows_clipped_fraction": 0.0}
    assert vector[0] == pytest.approx(100 / 255)  # every pixel of 4 rows at S = 4
    pooled = normalisation_from_sum(vector, [255.0] * 3, 4, 4, StatisticsNoise(1, 0.0, 10.0))
    assert pooled.mean[0] == pytest.approx(100.0)
    assert pooled.mean[2] == pytest.approx(255.0 / 16)
    with pytest.raises(InvalidRequest, match="features"):
        statistics_upload(images, [255.0], 4, clip_norm=1.0, noise_multiplier=0.0, rng=rng)


@dataclass
class _Site:
    id: str
    public_key: str
    status: str = SiteStatus.APPROVED.value


@dataclass
class _Status:
    last_seen_at: Any
    data_size: int | None


class _Repo:
    def __init__(self, sites: list[_Site], statuses: dict[str, _Status]):
        self._sites, self._statuses = sites, statuses

    def approved_site_keys(self) -> dict[str, str]:
        return {site.id: site.public_key for site in self._sites if site.status == SiteStatus.APPROVED.value}

    def site_statuses(self) -> dict[str, _Status]:
        return self._statuses


class _Members:
    def __init__(self, active: dict[str, str]):
        self._active = active

    def active(self, federation_id: str) -> dict[str, str]:
        return dict(self._active)


def _sampler(sites: list[_Site], statuses: dict[str, _Status], members: dict[str, str]) -> tuple[SiteSampler, _Repo]:
    return SiteSampler(_Members(members)), _Repo(sites, statuses)  # type: ignore[arg-type]


def test_a_sample_is_drawn_from_approved_members_with_their_pinned_key_preferring_online_ones() -> None:
    sites = [_Site(f"site-{i}", f"key{i}") for i in range(6)]
    sites[4].status = SiteStatus.REVOKED.value
    members = {s.id: s.public_key for s in sites}
    members["site-5"] = "another-key"  # the keyserver pinned a different key: not eligible
    now = utcnow()
    statuses = {
        "site-0": _Status(now, 10),
        "site-1": _Status(now, 10),
        "site-2": _Status(now - timedelta(hours=1), 10),
    }
    sampler, repo = _sampler(sites, statuses, members)
    fraction = SamplingSettings(mode=SamplingMode.FRACTION, fraction=1.0, min_sites=1)
    assert sampler.select(repo, "fed", fraction) == ["site-0", "site-1"]  # type: ignore[arg-type]
    sampler, repo = _sampler(sites, {}, members)
    assert sampler.select(repo, "fed", fraction) == ["site-0", "site-1", "site-2", "site-3"]  # type: ignore[arg-type]
    assert sampler.select(repo, "fed", SamplingSettings()) is None  # type: ignore[arg-type]


def test_weighted_sampling_draws_sites_in_proportion_to_their_data() -> None:
    sites = [_Site("big", "k1"), _Site("small", "k2")]
    now = utcnow()
    sampler, repo = _sampler(
        sites, {"big": _Status(now, 900), "small": _Status(now, 100)}, {s.id: s.public_key for s in sites}
    )
    weighted = SamplingSettings(mode=SamplingMode.WEIGHTED, fraction=0.5, min_sites=1)
    draws = [sampler.select(repo, "fed", weighted) for _ in range(2000)]  # type: ignore[arg-type]
    share = sum(draw == ["big"] for draw in draws) / len(draws)
    # Binomial(2000, 0.9): the standard deviation of the share is 0.0067; ±0.04 is six of them.
    assert 0.86 <= share <= 0.94


def test_an_update_from_another_model_build_or_other_versions_is_refused_naming_each_difference() -> None:
    from aggregator.intake import check_environment
    from fedhe.environment import current
    from fedhe.errors import InvalidUpdate
    from fedhe.modelspec import ModelFingerprint

    built = "a" * 64
    model = ModelSpec(
        architecture="mobilenet_v2",
        input_shape=(32, 32, 3),
        num_classes=2,
        fingerprint=ModelFingerprint(architecture_sha256=built, num_parameters=10, initial_weights_sha256="b" * 64),
    )
    environment = current()
    check_environment({"environment": environment.model_dump(), "model_sha256": built}, environment, model)
    other = environment.model_dump() | {"tensorflow": "2.16.1"}
    with pytest.raises(InvalidUpdate) as refused:
        check_environment({"environment": other, "model_sha256": "c" * 64}, environment, model)
    assert refused.value.code == "environment_mismatch"
    assert refused.value.detail is not None
    assert refused.value.detail["differences"] == [
        f"tensorflow: job has {environment.tensorflow}, site has 2.16.1",
        "model: job has architecture aaaaaaaaaaaa, site built cccccccccccc",
    ]


def test_the_plan_of_the_largest_site_counts_its_own_steps() -> None:
    """Sites of 116 and 300 rows take ceil(n / batch) steps at their own sampling rate: each plan is
    what that site's ledger will say (the larger site's ε is not the smaller one's)."""
    spec = _job(min_site_samples=116, max_site_samples=300, rounds=3, batch_size=16, dp={"noise_multiplier": 1.1})
    for rows in (116, 300):
        plan = privacy_plan(spec, rows)
        one_round = local_training_pass(num_samples=rows, batch_size=16, epochs=1, noise_multiplier=1.1)
        assert plan.final_epsilon == pytest.approx(epsilon_spent([one_round] * 3, spec.dp.delta))
    assert privacy_plan(spec, 300).final_epsilon != pytest.approx(privacy_plan(spec, 116).final_epsilon)
    warned = creation_warnings(spec.model_copy(update={"epsilon_warning": 0.01}), None, privacy_plan(spec, 300))
    assert any(w.startswith("a site of 300 training rows would reach") for w in warned), warned


def test_planning_a_site_too_small_for_the_jobs_delta_says_it_would_refuse() -> None:
    spec = _job(dp={"delta": 0.05})
    warned = creation_warnings(spec, privacy_plan(spec, 50))
    assert "a site of 50 training rows refuses this job: δ=0.05 is not below 1/n = 0.02" in warned


def test_the_plan_names_the_bytes_a_packing_setting_costs() -> None:
    """8 values (3 × 2 + 2) fit one ciphertext of 61,606 bytes: 16,384 values at 16 bits, 8,192 at 32."""
    default = upload_cost(_job())
    assert default is not None
    assert (default.bits, default.max_sites, default.num_values, default.upload_bytes) == (16, 128, 8, 61_606)
    assert default.bytes_per_parameter == pytest.approx(61_606 / 16_384)
    wide = upload_cost(_job(format_id=PACKED_FORMAT_ID, packing={"clip_range": 1.0, "bits": 32}))
    assert wide is not None
    assert wide.bytes_per_parameter == bytes_per_value(PackingSettings(clip_range=1.0, bits=32)) == 61_606 / 8192
    assert upload_cost(_job(format_id="ckks-seeded-last-v2", secure_aggregation=None)) is None
    with pytest.raises(InvalidRequest, match="lower bits or max_sites"):
        upload_cost(_job(format_id=PACKED_FORMAT_ID, packing={"clip_range": 1.0, "bits": 40}))
