"""What a job will cost before it runs: ε per round for a site of a given size, the bytes of an
encrypted upload, and doubts.

The aggregator plans every job at creation (``JobPublic.privacy_plan`` and ``warnings``), and
``fedhe privacy plan`` prints the same projection for a spec file, so an operator and every
site admin see the same numbers before any budget is spent.
"""

from __future__ import annotations

from fedhe.he.codec import PACKED_FORMAT_ID
from fedhe.he.context import BfvParameters
from fedhe.he.packing import PackingLayout, check_packing
from fedhe.job_options import PrivacyPlan, UploadCost
from fedhe.privacy import TrainingPass, epsilon_spent, local_training_pass, plan_epsilon, statistics_pass
from fedhe.schemas import JobCreate

# Beyond this ratio of S to the smallest site the packed codec's rounding shows in the average.
_MAX_SAMPLE_BOUND_RATIO = 50
PLANNED_ROUNDS = 100
"""Rounds planned one by one; a longer job's plan lists these and gives the last round's ε directly
(each round of the curve is one more PLD composition, so planning stays within seconds)."""


def privacy_plan(spec: JobCreate, num_samples: int) -> PrivacyPlan:
    """ε after each training round (the first ``PLANNED_ROUNDS``) and after the last, for a site with
    ``num_samples`` training rows taking part in every round (and in the statistics step, if any)."""
    before = job_statistics_passes(spec)
    per_round = plan_epsilon(
        num_samples=num_samples,
        batch_size=spec.batch_size,
        noise_multiplier=spec.dp.noise_multiplier,
        local_epochs=spec.local_epochs,
        rounds=min(spec.rounds, PLANNED_ROUNDS),
        delta=spec.dp.delta,
        before=before,
    )
    final = per_round[-1]
    if spec.rounds > PLANNED_ROUNDS:
        one_round = local_training_pass(
            num_samples=num_samples,
            batch_size=spec.batch_size,
            epochs=spec.local_epochs,
            noise_multiplier=spec.dp.noise_multiplier,
        )
        final = epsilon_spent([*before, *[one_round] * spec.rounds], spec.dp.delta)
    return PrivacyPlan(num_samples=num_samples, delta=spec.dp.delta, epsilon_per_round=per_round, final_epsilon=final)


def upload_cost(
    spec: JobCreate, parameters: BfvParameters | None = None, *, layout: PackingLayout | None = None
) -> UploadCost | None:
    """Bytes per parameter and per site upload of a training round for a job run with the packed
    codec, or None for a job of another format. The layout is the federation's codec's when the
    aggregator plans a job, else the one ``parameters`` imply (the default BFV parameters if
    None, as ``fedhe privacy plan`` assumes). Raises ``InvalidRequest`` if the packing cannot hold the sum."""
    if spec.format_id not in (None, PACKED_FORMAT_ID):
        return None
    # The settings the aggregator resolves for a BFV federation: the job's own, or the defaults.
    settings = spec.packing or JobCreate.model_validate({**spec.model_dump(), "format_id": PACKED_FORMAT_ID}).packing
    assert settings is not None
    layout = layout or check_packing(settings, parameters)
    values = spec.model.num_update_values()
    return UploadCost(
        bits=settings.bits,
        clip_range=settings.clip_range,
        max_sites=settings.max_sites,
        bytes_per_parameter=layout.bytes_per_value(),
        num_values=values,
        upload_bytes=layout.upload_bytes(values),
    )


def job_statistics_passes(spec: JobCreate) -> list[TrainingPass]:
    """What the job's statistics step charges every site's ledger (nothing without one)."""
    return [] if spec.statistics is None else [statistics_pass(spec.statistics.noise_multiplier)]


def creation_warnings(spec: JobCreate, plan: PrivacyPlan | None, largest: PrivacyPlan | None = None) -> list[str]:
    """What an operator should reconsider before the job runs (it still runs), given the plans of
    the smallest site and, if declared, the largest."""
    warnings = []
    if spec.secure_aggregation is None:
        warnings.append(
            "secure aggregation is off: any one member site together with the coordinator can read every "
            "site's update of this job (only DP-SGD then limits what it reveals)"
        )
    if plan is None:
        warnings.append("min_site_samples is not set, so the job's privacy cost was not planned")
    for site in (plan, largest):
        if site is not None and site.final_epsilon > spec.epsilon_warning:
            warnings.append(
                f"a site of {site.num_samples} training rows would reach ε={site.final_epsilon:.2f} at "
                f"δ={site.delta:g} after {spec.rounds} rounds, over epsilon_warning={spec.epsilon_warning:g}; "
                "raise dp.noise_multiplier or lower rounds, local_epochs or batch_size"
            )
        if site is not None and site.delta >= 1 / site.num_samples:
            warnings.append(
                f"a site of {site.num_samples} training rows refuses this job: δ={site.delta:g} is not below "
                f"1/n = {1 / site.num_samples:.3g}"
            )
    if (
        spec.format_id == PACKED_FORMAT_ID
        and spec.min_site_samples is not None
        and spec.max_samples_per_round > _MAX_SAMPLE_BOUND_RATIO * spec.min_site_samples
    ):
        warnings.append(
            f"max_samples_per_round={spec.max_samples_per_round} is over {_MAX_SAMPLE_BOUND_RATIO}x min_site_samples: "
            "the packed codec's rounding error in the average grows with S / Σ n_k; set S near the largest site"
        )
    return warnings
