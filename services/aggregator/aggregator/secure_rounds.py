"""The aggregator's part in secure rounds (ADR 0010): keys, rosters, statements, answers, seeds.

The aggregator relays and stores; it decides nothing a site does not check again. It still
checks what it can, early, so a bad message is refused with a named reason instead of failing
the round later: advertisements and upload statements against the site's registered key,
statements against the round's roster, each share of an answer against its dealer's
commitment, and every rebuilt seed against its owner's commitment.
"""

from __future__ import annotations

import base64
from collections import Counter

from aggregator.repository import AggregatorRepository
from aggregator.rounds import RoundCounts
from aggregator.tables import AdvertisementRow, RoundRow, UnmaskingAnswerRow
from fedhe.errors import Conflict, InvalidRequest, InvalidUpdate
from fedhe.schemas import JobCreate, RoundState
from fedhe.secagg.messages import AdvertisementCreate, Roster, RosterEntry, Transcript, UnmaskingAnswer, UploadStatement
from fedhe.secagg.shares import combine_shares
from fedhe.secagg.statements import (
    RoundAttempt,
    UploadFacts,
    advertisement,
    holders_of,
    positions,
    roster_sha256,
    self_mask_commitment,
    share_commitment,
    signature_valid,
    upload_statement,
)


def round_attempt(row: RoundRow) -> RoundAttempt:
    """The attempt a round row is."""
    return RoundAttempt(row.job_id, row.number, row.attempt)


def roster_of(spec: JobCreate, row: RoundRow) -> Roster:
    """A round's fixed roster; ``Conflict`` if the job has none or advertising has not closed yet."""
    if spec.threshold is None:
        raise Conflict("this job runs without secure aggregation: its rounds have no roster", code="not_secure")
    if row.roster is None:
        raise Conflict(f"round {row.number} has no roster yet (sites are still advertising keys)", code="no_roster")
    return Roster(
        job_id=row.job_id,
        round=row.number,
        attempt=row.attempt,
        threshold=spec.threshold,
        members=[RosterEntry.model_validate(member) for member in row.roster],
    )


def round_counts(repo: AggregatorRepository, spec: JobCreate, row: RoundRow, expected: int) -> RoundCounts:
    """What ``RoundRules`` needs to know about a round attempt."""
    declined = [d.site_id for d in repo.declines(row.id)]
    roster = {m["site_id"] for m in row.roster or []}
    unmasked = False
    if row.state == RoundState.UNMASKING.value and spec.threshold is not None:
        held = Counter(owner for answer in repo.unmasking_answers(row.id) for owner in answer.shares)
        unmasked = all(held[site] >= spec.threshold for site in roster)
    return RoundCounts(
        expected=expected,
        advertised=repo.count_advertisements(row.id),
        uploaded=row.num_submissions,
        declined=len(declined),
        roster=len(roster),
        roster_declined=sum(1 for site in declined if site in roster),
        unmasked=unmasked,
    )


def record_advertisement(
    repo: AggregatorRepository, row: RoundRow, spec: JobCreate, site_id: str, body: AdvertisementCreate
) -> None:
    """Store a site's key for this attempt, once; refused unless it is signed by the site's registered key."""
    if body.attempt != row.attempt:
        raise Conflict(
            f"round {row.number} is at attempt {row.attempt}, not {body.attempt}",
            code="wrong_attempt",
            detail={"attempt": row.attempt},
        )
    earlier = repo.advertisement(row.id, site_id)
    if earlier is not None:
        if earlier.public_key == body.public_key and earlier.signature == body.signature:
            return
        raise Conflict(
            f"site already advertised a key for round {row.number} attempt {row.attempt}", code="duplicate_key"
        )
    if spec.packing is not None and repo.count_advertisements(row.id) >= spec.packing.max_sites:
        raise Conflict(
            f"round {row.number} already has the job's max_sites={spec.packing.max_sites} members", code="round_full"
        )
    message = advertisement(round_attempt(row), site_id, body.public_key)
    if not signature_valid(repo.site(site_id).public_key, message, body.signature):
        raise InvalidRequest(
            "the advertisement's signature does not verify with this site's registered key for this attempt",
            code="bad_signature",
        )
    repo.add(AdvertisementRow(round_id=row.id, site_id=site_id, public_key=body.public_key, signature=body.signature))


def fix_roster(repo: AggregatorRepository, row: RoundRow) -> None:
    """The round's roster: every advertisement so far, sorted by site id."""
    row.roster = [
        {"site_id": ad.site_id, "public_key": ad.public_key, "signature": ad.signature}
        for ad in sorted(repo.advertisements(row.id), key=lambda ad: ad.site_id)
    ]


def check_statement(
    repo: AggregatorRepository,
    spec: JobCreate,
    row: RoundRow,
    site_id: str,
    raw: object,
    *,
    num_samples: int,
    facts: UploadFacts,
) -> UploadStatement:
    """An upload's statement, checked against the roster and the site's key (not yet its chunks' hash)."""
    try:
        statement = UploadStatement.model_validate(raw)
    except ValueError as exc:
        raise InvalidUpdate(
            "a secure round's upload needs its signed statement (meta.secagg)", code="invalid_statement"
        ) from exc
    roster = roster_of(spec, row)
    others = set(holders_of(roster, site_id))
    problems = []
    if statement.site_id != site_id:
        problems.append("it names another site")
    if statement.roster_sha256 != roster_sha256(roster):
        problems.append("it was masked for another roster")
    if statement.num_samples != num_samples:
        problems.append("its n_k differs from the header's")
    if set(statement.share_commitments) != others or set(statement.sealed_shares) != others:
        problems.append("it does not deal one share to every other roster member")
    message = upload_statement(round_attempt(row), facts, statement)
    if not problems and not signature_valid(repo.site(site_id).public_key, message, statement.signature):
        problems.append("its signature does not verify with this site's registered key")
    if problems:
        raise InvalidUpdate("the upload's statement is refused: " + "; ".join(problems), code="invalid_statement")
    return statement


def statements(repo: AggregatorRepository, row: RoundRow) -> dict[str, UploadStatement]:
    """Every counted upload's statement in a round attempt, by site."""
    return {
        s.site_id: UploadStatement.model_validate(s.statement)
        for s in repo.submissions(row.id)
        if s.statement is not None
    }


def record_answer(
    repo: AggregatorRepository, spec: JobCreate, row: RoundRow, site_id: str, answer: UnmaskingAnswer
) -> None:
    """Store a roster member's shares, each checked against the commitment its dealer signed."""
    if answer.attempt != row.attempt:
        raise Conflict(f"round {row.number} is at attempt {row.attempt}, not {answer.attempt}", code="wrong_attempt")
    if row.state != RoundState.UNMASKING.value:
        raise Conflict(f"round {row.number} is {row.state}; it takes no unmasking answers", code="not_unmasking")
    roster = roster_of(spec, row)
    position = positions(roster)
    if site_id not in position:
        raise Conflict(f"this site is not in round {row.number}'s roster", code="not_in_roster")
    if repo.unmasking_answer(row.id, site_id) is not None:
        raise Conflict(f"site already answered round {row.number}'s unmasking", code="duplicate_answer")
    dealt = statements(repo, row)
    at = round_attempt(row)
    bad = []
    for owner, encoded in answer.shares.items():
        share = base64.b64decode(encoded)
        commitment = dealt[owner].share_commitments.get(site_id) if owner in dealt and owner != site_id else None
        if commitment is None or share_commitment(at, owner, site_id, position[site_id], share) != commitment:
            bad.append(owner)
    if bad:
        raise InvalidRequest(
            f"{len(bad)} share(s) do not match what their dealers committed to for this site",
            code="bad_share",
            detail={"owners": sorted(bad)},
        )
    repo.add(UnmaskingAnswerRow(round_id=row.id, site_id=site_id, shares=dict(answer.shares)))


def rebuild_seeds(repo: AggregatorRepository, spec: JobCreate, row: RoundRow) -> str | None:
    """Rebuild every roster member's self-mask seed from t answers and keep them with the round;
    returns why that failed, or None."""
    roster = roster_of(spec, row)
    assert spec.threshold is not None
    position = positions(roster)
    dealt = statements(repo, row)
    held: dict[str, dict[int, bytes]] = {site: {} for site in position}
    for answer in repo.unmasking_answers(row.id):
        for owner, encoded in answer.shares.items():
            held[owner][position[answer.site_id]] = base64.b64decode(encoded)
    at = round_attempt(row)
    seeds: dict[str, str] = {}
    for owner, shares in held.items():
        chosen = dict(sorted(shares.items())[: spec.threshold])
        seed = combine_shares(chosen)
        if self_mask_commitment(at, owner, seed) != dealt[owner].self_mask_commitment:
            return f"{owner}'s shares do not rebuild the seed it committed to (a member dealt inconsistent shares)"
        seeds[owner] = base64.b64encode(seed).decode()
    row.self_mask_seeds = seeds
    return None


def transcript(repo: AggregatorRepository, spec: JobCreate, row: RoundRow, caller_site: str | None) -> Transcript:
    """A round attempt's transcript; to a site, each statement carries only the share sealed for it."""
    roster = roster_of(spec, row)
    listed = [
        statement.model_copy(
            update={"sealed_shares": {h: v for h, v in statement.sealed_shares.items() if h == caller_site}}
        )
        for _, statement in sorted(statements(repo, row).items())
    ]
    return Transcript(roster=roster, statements=listed, self_mask_seeds=row.self_mask_seeds or {})
