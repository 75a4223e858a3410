"""The site's side of secure aggregation (ADR 0010): what it checks, masks, signs and answers.

A site trusts the coordinator for nothing it can check. Every signature it relies on is
checked against the keys the keyserver pins for its federation's members (``FederationKeys``),
never against a key the coordinator relays; every message is bound to one round attempt.

- before uploading: the roster (``check_roster``), then ``prepare_upload`` gives the masks to
  encrypt with, the sealed shares and the commitments, and ``sign_statement`` signs them;
- before answering the unmasking: the transcript holds every roster member's signed
  statement over the same roster, this site's own among them (``unmasking_answer``);
- before applying an aggregate: ``published_masks`` checks the published attempt's transcript
  and returns the self masks to remove; the codec then refuses a sum honest inputs cannot make.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedhe.errors import AggregateRefused, InvalidRequest
from fedhe.secagg.keys import AttemptKey
from fedhe.secagg.masks import CoefficientMasks, MaskTerm, pairwise_sign, self_mask_key, self_masks
from fedhe.secagg.messages import Roster, Transcript, UnmaskingAnswer, UploadStatement
from fedhe.secagg.shares import SEED_BYTES, split_seed
from fedhe.secagg.statements import (
    RoundAttempt,
    UploadFacts,
    advertisement,
    holders_of,
    positions,
    roster_sha256,
    self_mask_commitment,
    share_commitment,
    sign,
    signature_valid,
    upload_statement,
)


def sign_advertisement(signing_key: Ed25519PrivateKey, at: RoundAttempt, me: str, key: AttemptKey) -> str:
    """This site's signature over its X25519 key for attempt ``at``."""
    return sign(signing_key, advertisement(at, me, key.public_key))


def check_roster(
    roster: Roster,
    at: RoundAttempt,
    me: str,
    key: AttemptKey,
    pinned: Mapping[str, str],
    *,
    min_members: int,
    threshold: int,
) -> None:
    """Refuse (``InvalidRequest``, code ``roster_refused``) a roster this site must not mask against."""
    problems = []
    if (roster.job_id, roster.round, roster.attempt) != (at.job_id, at.round, at.attempt):
        problems.append("it is for another round attempt")
    if roster.threshold != threshold:
        problems.append(f"its threshold {roster.threshold} is not the job's {threshold}")
    ids = [m.site_id for m in roster.members]
    if ids != sorted(set(ids)):
        problems.append("its members are not distinct and sorted")
    if len(ids) < min_members:
        problems.append(f"it has {len(ids)} members, fewer than {min_members}")
    if not any(m.site_id == me and m.public_key == key.public_key for m in roster.members):
        problems.append("it does not hold this site's own key")
    for member in roster.members:
        if member.site_id not in pinned:
            problems.append(f"{member.site_id} is not an active member at the keyserver")
        elif not signature_valid(
            pinned[member.site_id], advertisement(at, member.site_id, member.public_key), member.signature
        ):
            problems.append(f"{member.site_id}'s key is not signed with its pinned key for this attempt")
    if problems:
        raise InvalidRequest("the round's roster is refused: " + "; ".join(problems), code="roster_refused")


@dataclass(frozen=True)
class PreparedUpload:
    """What this site encrypts with and states about its upload to one attempt."""

    masks: CoefficientMasks
    self_mask_commitment: str
    share_commitments: dict[str, str]
    sealed_shares: dict[str, str]


def prepare_upload(at: RoundAttempt, me: str, key: AttemptKey, roster: Roster) -> PreparedUpload:
    """A fresh self-mask seed, its shares sealed for the other members, and every mask to add."""
    seed = os.urandom(SEED_BYTES)
    holders = holders_of(roster, me)
    shares = split_seed(seed, roster.threshold, holders, len(roster.members))
    peers = {m.site_id: key.pair_keys(at, me, m.site_id, m.public_key) for m in roster.members if m.site_id != me}
    terms = [MaskTerm(self_mask_key(at, me, seed), 1)]
    terms += [MaskTerm(pair.mask_key, pairwise_sign(me, peer)) for peer, pair in sorted(peers.items())]
    return PreparedUpload(
        masks=CoefficientMasks(tuple(terms)),
        self_mask_commitment=self_mask_commitment(at, me, seed),
        share_commitments={h: share_commitment(at, me, h, holders[h], share) for h, share in shares.items()},
        sealed_shares={h: peers[h].seal(at, me, h, share) for h, share in shares.items()},
    )


def sign_statement(
    signing_key: Ed25519PrivateKey,
    at: RoundAttempt,
    facts: UploadFacts,
    *,
    me: str,
    roster: Roster,
    prepared: PreparedUpload,
    num_samples: int,
    chunks_sha256: str,
) -> UploadStatement:
    """The signed statement that travels with this site's masked upload."""
    fields: dict[str, Any] = {
        "site_id": me,
        "roster_sha256": roster_sha256(roster),
        "num_samples": num_samples,
        "chunks_sha256": chunks_sha256,
        "self_mask_commitment": prepared.self_mask_commitment,
        "share_commitments": prepared.share_commitments,
        "sealed_shares": prepared.sealed_shares,
    }
    signature = sign(signing_key, upload_statement(at, facts, UploadStatement.model_construct(**fields)))
    return UploadStatement.model_validate({**fields, "signature": signature})


def _check_statements(
    transcript: Transcript, at: RoundAttempt, pinned: Mapping[str, str], facts: UploadFacts
) -> list[str]:
    """What is wrong with a transcript's statements (empty if nothing): one per roster member, each
    signed with its member's pinned key over this attempt and the transcript's roster."""
    problems = []
    roster = transcript.roster
    if (roster.job_id, roster.round, roster.attempt) != (at.job_id, at.round, at.attempt):
        problems.append("it is for another round attempt")
    expected = roster_sha256(roster)
    stated = [s.site_id for s in transcript.statements]
    if sorted(stated) != [m.site_id for m in roster.members] or len(set(stated)) != len(stated):
        problems.append("it does not hold exactly one statement per roster member")
    for statement in transcript.statements:
        if statement.roster_sha256 != expected:
            problems.append(f"{statement.site_id} masked for another roster")
        elif statement.site_id not in pinned or not signature_valid(
            pinned[statement.site_id], upload_statement(at, facts, statement), statement.signature
        ):
            problems.append(f"{statement.site_id}'s statement is not signed with its pinned key")
    return problems


def unmasking_answer(
    transcript: Transcript,
    at: RoundAttempt,
    me: str,
    key: AttemptKey,
    mine: UploadStatement,
    pinned: Mapping[str, str],
    facts: UploadFacts,
) -> UnmaskingAnswer:
    """The shares this site holds of the other members' seeds, once the transcript shows every
    roster member uploaded over the roster this site masked against (``InvalidRequest`` if not)."""
    problems = _check_statements(transcript, at, pinned, facts)
    if roster_sha256(transcript.roster) != mine.roster_sha256:
        problems.append("its roster is not the one this site masked against")
    own = [s for s in transcript.statements if s.site_id == me]
    if len(own) != 1 or own[0].chunks_sha256 != mine.chunks_sha256:
        problems.append("it does not hold this site's own upload")
    if problems:
        raise InvalidRequest("the unmasking request is refused: " + "; ".join(problems), code="unmasking_refused")
    position = positions(transcript.roster)[me]
    keys = {m.site_id: m.public_key for m in transcript.roster.members}
    shares = {}
    for statement in transcript.statements:
        if statement.site_id == me:
            continue
        pair = key.pair_keys(at, me, statement.site_id, keys[statement.site_id])
        share = pair.open(at, statement.site_id, me, statement.sealed_shares[me])
        if share_commitment(at, statement.site_id, me, position, share) != statement.share_commitments.get(me):
            raise InvalidRequest(
                f"{statement.site_id} dealt this site a share that does not match its commitment", code="bad_share"
            )
        shares[statement.site_id] = base64.b64encode(share).decode()
    return UnmaskingAnswer(attempt=at.attempt, shares=shares)


@dataclass(frozen=True)
class PublishedRound:
    """What this site itself knows about a published round: what it uploaded and answered."""

    mine: UploadStatement | None
    """The statement of this site's upload to the published attempt, if it uploaded to it."""
    answered_attempt: int | None


def published_masks(
    transcript: Transcript,
    at: RoundAttempt,
    me: str,
    own: PublishedRound,
    pinned: Mapping[str, str],
    facts: UploadFacts,
    *,
    min_statements: int,
    total_samples: int,
) -> CoefficientMasks:
    """The self masks to remove from a published attempt's sum, once its transcript proves an honest
    sum; ``AggregateRefused`` naming every problem otherwise."""
    problems = _check_statements(transcript, at, pinned, facts)
    if len(transcript.statements) < min_statements:
        problems.append(f"it sums {len(transcript.statements)} signed uploads, fewer than {min_statements}")
    if own.answered_attempt is not None and own.answered_attempt != at.attempt:
        problems.append(f"this site answered attempt {own.answered_attempt}'s unmasking, not this attempt's")
    mine = own.mine
    if mine is not None and not any(
        s.site_id == me and s.chunks_sha256 == mine.chunks_sha256 for s in transcript.statements
    ):
        problems.append("this site uploaded to this attempt and its upload is not in the sum")
    if sum(s.num_samples for s in transcript.statements) != total_samples:
        problems.append("its total_samples is not the sum of the signed n_k")
    seeds = {}
    commitments = {s.site_id: s.self_mask_commitment for s in transcript.statements}
    for site, encoded in transcript.self_mask_seeds.items():
        seed = base64.b64decode(encoded)
        if commitments.get(site) != self_mask_commitment(at, site, seed):
            problems.append(f"{site}'s published seed is not the one it committed to")
        seeds[site] = seed
    if set(seeds) != set(commitments):
        problems.append("it does not publish every member's self-mask seed")
    if problems:
        raise AggregateRefused("the published aggregate is refused: " + "; ".join(problems))
    return self_masks(at, seeds).negated()
