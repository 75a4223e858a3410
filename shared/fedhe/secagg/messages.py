"""The secure-aggregation messages sites and the aggregator exchange (ADR 0010).

Everything a site signs is bound to one ``(job, round, attempt)``; the canonical bytes that are
signed live in ``fedhe.secagg.statements``. Binary values travel as base64, hashes as hex.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from fedhe.identifiers import JobId, SiteId

B64_32 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{43}=$")]
"""Base64 of 32 bytes (an X25519 public key)."""
B64_16 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{22}==$")]
"""Base64 of 16 bytes (a self-mask seed)."""
B64_17 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{23}=$")]
"""Base64 of 17 bytes (a Shamir share: an element of GF(2^130 − 5))."""
SIGNATURE = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{86}==$")]
"""Base64 of a 64-byte Ed25519 signature."""
SHA256_HEX = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
SEALED_SHARE = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{60}$")]
"""Base64 of a share sealed for its holder: 12-byte nonce, 17-byte share, 16-byte tag."""


class AdvertisementCreate(BaseModel):
    """A site's fresh X25519 public key for one round attempt, signed with its pinned Ed25519 key."""

    model_config = ConfigDict(extra="forbid")

    attempt: int = Field(ge=1, le=100)
    public_key: B64_32
    signature: SIGNATURE


class RosterEntry(BaseModel):
    """One member of a round attempt's roster, as it advertised itself."""

    model_config = ConfigDict(extra="forbid")

    site_id: SiteId
    public_key: B64_32
    signature: SIGNATURE


class Roster(BaseModel):
    """The sites whose uploads a round attempt sums, fixed when advertising closes (sorted by site id)."""

    model_config = ConfigDict(extra="forbid")

    job_id: JobId
    round: int = Field(ge=0)
    attempt: int = Field(ge=1)
    threshold: int = Field(ge=2, description="t: shares needed to rebuild a member's self-mask seed")
    members: list[RosterEntry]


class UploadStatement(BaseModel):
    """What a site signs about its masked upload; it travels in the upload's envelope header."""

    model_config = ConfigDict(extra="forbid")

    site_id: SiteId
    roster_sha256: SHA256_HEX
    num_samples: int = Field(ge=1)
    chunks_sha256: SHA256_HEX = Field(description="SHA-256 over every ciphertext chunk, each prefixed by its length")
    self_mask_commitment: SHA256_HEX
    share_commitments: dict[SiteId, SHA256_HEX] = Field(description="per holder, a commitment to its share")
    sealed_shares: dict[SiteId, SEALED_SHARE] = Field(description="per holder, its share sealed for it alone")
    signature: SIGNATURE


class Transcript(BaseModel):
    """A round attempt's roster, every signed upload statement, and (once unmasked) the self-mask seeds.

    To a site, ``sealed_shares`` of each statement holds only the share sealed for that site.
    """

    roster: Roster
    statements: list[UploadStatement]
    self_mask_seeds: dict[SiteId, B64_16] = Field(default_factory=dict)


class UnmaskingAnswer(BaseModel):
    """A roster member's answer: the shares it holds of the other members' self-mask seeds."""

    model_config = ConfigDict(extra="forbid")

    attempt: int = Field(ge=1, le=100)
    shares: dict[SiteId, B64_17]
