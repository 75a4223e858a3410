"""A site's local privacy policy: limits the site admin sets that no job can loosen."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedhe.errors import InvalidRequest
from fedhe.privacy import DPSettings


class SitePolicy(BaseModel):
    """Local limits on DP-SGD; a job's settings are tightened to meet them, never loosened."""

    model_config = ConfigDict(extra="forbid")

    max_l2_norm_clip: float | None = Field(default=None, gt=0)
    min_noise_multiplier: float | None = Field(default=None, gt=0)
    max_delta: float | None = Field(default=None, gt=0, lt=1)
    max_epsilon: float | None = Field(default=None, gt=0, description="stop training once the site's ε would pass this")
    min_secure_aggregation_threshold: int | None = Field(
        default=None,
        ge=2,
        description="refuse jobs whose secure aggregation tolerates fewer colluding members (t - 1) than this minus 1",
    )

    def tighten(self, job: DPSettings) -> DPSettings:
        """The job's DP settings, made at least as strict as this policy."""
        clip = job.l2_norm_clip if self.max_l2_norm_clip is None else min(job.l2_norm_clip, self.max_l2_norm_clip)
        noise = (
            job.noise_multiplier
            if self.min_noise_multiplier is None
            else max(job.noise_multiplier, self.min_noise_multiplier)
        )
        delta = job.delta if self.max_delta is None else min(job.delta, self.max_delta)
        return DPSettings(l2_norm_clip=clip, noise_multiplier=noise, delta=delta)


def load_policy(path: Path | None) -> SitePolicy:
    """The policy in a JSON file, or the empty policy when there is none."""
    if path is None:
        return SitePolicy()
    try:
        return SitePolicy.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, ValidationError) as exc:
        raise InvalidRequest(f"site policy {path} is not valid: {exc}") from exc
