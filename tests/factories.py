"""Shared factories for the tests' requests: jobs, model specs and sites.

Each returns a valid request with small defaults; pass keyword overrides for what a test is about,
so a test names only the fields it depends on (``job_create(key_id, min_sites=2)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedhe.auth import generate_signing_key, public_key_b64
from fedhe.modelspec import ModelSpec
from fedhe.schemas import JobCreate, MemberCreate, SiteCreate


def model_spec(features: int = 2, num_classes: int = 2, **overrides: Any) -> ModelSpec:
    """A softmax regression over ``features`` inputs (``features * num_classes + num_classes`` weights)."""
    return ModelSpec.model_validate({"input_shape": [features], "num_classes": num_classes, **overrides})


def job_create(key_id: str, **overrides: Any) -> JobCreate:
    """A job on ``key_id`` with ``JobCreate``'s own defaults, a 2-feature model and the name "job"."""
    fields: dict[str, Any] = {"name": "job", "model": model_spec()}
    return JobCreate.model_validate(fields | {"key_id": key_id, **overrides})


def plain_job_create(key_id: str, **overrides: Any) -> JobCreate:
    """A job without secure aggregation (updates summed as uploaded), one round of at least two sites."""
    fields: dict[str, Any] = {
        "rounds": 1,
        "min_sites": 2,
        "round_deadline_s": 3600,
        "max_samples_per_round": 1000,
        "secure_aggregation": None,
    }
    return job_create(key_id, **(fields | overrides))


@dataclass(frozen=True)
class SiteIdentity:
    """A site's name and Ed25519 signing key, before it registers."""

    name: str
    signing_key: Ed25519PrivateKey

    @property
    def public_key(self) -> str:
        return public_key_b64(self.signing_key)

    def site_create(self, **overrides: Any) -> SiteCreate:
        """The site admin's registration request."""
        fields = {
            "name": self.name,
            "organisation": f"{self.name} organisation",
            "contact": f"admin@{self.name}.example",
            "public_key": self.public_key,
        }
        return SiteCreate.model_validate(fields | overrides)

    def member_create(self, site_id: str) -> MemberCreate:
        """The keyserver admin's admission of this site, its public key pinned."""
        return MemberCreate(site_id=site_id, public_key=self.public_key, name=self.name)


def site_identity(name: str = "site") -> SiteIdentity:
    """A new site identity with a fresh signing key."""
    return SiteIdentity(name, generate_signing_key())
