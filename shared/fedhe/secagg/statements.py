"""The exact bytes secure-aggregation signatures and hashes cover (ADR 0010).

A statement is a version, a purpose and its fields joined by line breaks (no field may hold
one), so two different statements can never share bytes. Every statement names the job, round
and attempt it belongs to: a signature from one attempt is worthless in any other.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedhe.auth import parse_public_key
from fedhe.errors import InvalidRequest
from fedhe.secagg.messages import Roster, UploadStatement

VERSION = "fedhe-secagg-v1"


@dataclass(frozen=True)
class RoundAttempt:
    """The one round attempt a message belongs to."""

    job_id: str
    round: int
    attempt: int

    def fields(self) -> list[str]:
        """The attempt as statement fields."""
        return [self.job_id, str(self.round), str(self.attempt)]


def statement(purpose: str, fields: Sequence[str]) -> bytes:
    """The canonical bytes of a statement."""
    parts = [VERSION, purpose, *fields]
    if any("\n" in part for part in parts):
        raise InvalidRequest("statement fields must not contain line breaks")
    return "\n".join(parts).encode()


def digest(purpose: str, fields: Sequence[str], *blobs: bytes) -> str:
    """SHA-256 (hex) of a statement followed by binary values, each prefixed by its length."""
    h = hashlib.sha256(statement(purpose, fields))
    for blob in blobs:
        h.update(len(blob).to_bytes(8, "big"))
        h.update(blob)
    return h.hexdigest()


def sign(key: Ed25519PrivateKey, message: bytes) -> str:
    """Base64 Ed25519 signature of ``message``."""
    return base64.b64encode(key.sign(message)).decode()


def signature_valid(public_key_b64: str, message: bytes, signature: str) -> bool:
    """Whether ``signature`` is ``public_key_b64``'s signature of ``message``."""
    try:
        parse_public_key(public_key_b64).verify(base64.b64decode(signature, validate=True), message)
    except (InvalidSignature, InvalidRequest, ValueError):
        return False
    return True


def advertisement(at: RoundAttempt, site_id: str, public_key: str) -> bytes:
    """What a site signs when it advertises its X25519 key for one attempt."""
    return statement("advertise", [*at.fields(), site_id, public_key])


def roster_sha256(roster: Roster) -> str:
    """The hash every upload statement names: attempt, threshold and each member's advertised key."""
    at = RoundAttempt(roster.job_id, roster.round, roster.attempt)
    members = [f"{m.site_id}={m.public_key}" for m in roster.members]
    return digest("roster", [*at.fields(), str(roster.threshold), *members])


def chunks_sha256(chunks: Iterable[bytes]) -> str:
    """SHA-256 over ciphertext chunks, each prefixed by its 8-byte length."""
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(len(chunk).to_bytes(8, "big"))
        h.update(chunk)
    return h.hexdigest()


class ChunkHasher:
    """``chunks_sha256`` computed as chunks stream in."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, chunk: bytes) -> None:
        """Add the next chunk."""
        self._h.update(len(chunk).to_bytes(8, "big"))
        self._h.update(chunk)

    def hexdigest(self) -> str:
        """The hash of every chunk added so far."""
        return self._h.hexdigest()


def self_mask_commitment(at: RoundAttempt, owner: str, seed: bytes) -> str:
    """A binding, hiding commitment to a member's 128-bit self-mask seed."""
    return digest("self-mask", [*at.fields(), owner], seed)


def share_commitment(at: RoundAttempt, owner: str, holder: str, index: int, share: bytes) -> str:
    """A commitment to the share of ``owner``'s seed that ``holder`` holds (x-coordinate ``index``)."""
    return digest("share", [*at.fields(), owner, holder, str(index)], share)


@dataclass(frozen=True)
class UploadFacts:
    """What the job fixes about an upload, which its statement's signature also covers."""

    key_id: str
    format_id: str
    num_values: int


def upload_statement(at: RoundAttempt, facts: UploadFacts, body: UploadStatement) -> bytes:
    """What a site signs about its masked upload (everything in ``body`` but the sealed shares)."""
    commitments = sorted(body.share_commitments.items())
    return statement(
        "upload",
        [
            *at.fields(),
            body.site_id,
            body.roster_sha256,
            str(body.num_samples),
            facts.key_id,
            facts.format_id,
            str(facts.num_values),
            body.chunks_sha256,
            body.self_mask_commitment,
            *(f"{holder}={commitment}" for holder, commitment in commitments),
        ],
    )


def positions(roster: Roster) -> dict[str, int]:
    """Each member's Shamir x-coordinate: its 1-based position in the roster."""
    return {m.site_id: position for position, m in enumerate(roster.members, start=1)}


def holders_of(roster: Roster, owner: str) -> Mapping[str, int]:
    """Every member of the roster but ``owner``, with its Shamir x-coordinate."""
    return {site: position for site, position in positions(roster).items() if site != owner}
