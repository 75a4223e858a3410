"""Which sites a training round asks for: all members, or a random subset drawn when it opens.

The draw uses OS entropy: nobody, the operator included, can steer which sites a round asks
for by choosing a seed. The subset is stored with the round, so every replica refuses the same
uploads (``not_selected``) and the round closes as soon as every selected site has answered.
"""

from __future__ import annotations

import secrets

import numpy as np

from aggregator.membership import FederationMembers
from aggregator.repository import ONLINE_WITHIN, AggregatorRepository
from fedhe.db import utcnow
from fedhe.job_options import SamplingMode, SamplingSettings


def eligible_members(repo: AggregatorRepository, members: FederationMembers, federation_id: str) -> list[str]:
    """Sites that can answer a round: active members at the keyserver, approved here with the same key."""
    approved = repo.approved_site_keys()
    return sorted(site_id for site_id, key in members.active(federation_id).items() if approved.get(site_id) == key)


class SiteSampler:
    """Draws each sampled round's sites from the federation's eligible members."""

    def __init__(self, members: FederationMembers):
        self._members = members

    def select(self, repo: AggregatorRepository, federation_id: str, settings: SamplingSettings) -> list[str] | None:
        """The sites a new training round asks for; ``None`` when every member may upload."""
        if settings.mode == SamplingMode.ALL:
            return None
        eligible = eligible_members(repo, self._members, federation_id)
        statuses = repo.site_statuses()
        recent = utcnow() - ONLINE_WITHIN
        online = [site for site in eligible if site in statuses and statuses[site].last_seen_at >= recent]
        pool = online or eligible
        if not pool:
            return []
        count = settings.count(len(pool))
        probabilities = None
        if settings.mode == SamplingMode.WEIGHTED:
            sizes = [statuses[site].data_size if site in statuses else None for site in pool]
            known = [size for size in sizes if size]
            # A site that never said how much data it has counts as an average one.
            fallback = float(np.mean(known)) if known else 1.0
            weights = np.array([float(size) if size else fallback for size in sizes])
            probabilities = weights / weights.sum()
        rng = np.random.default_rng(secrets.randbits(128))
        chosen = rng.choice(len(pool), size=count, replace=False, p=probabilities)
        return sorted(pool[int(i)] for i in chosen)
