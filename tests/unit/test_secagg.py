"""Secure aggregation's pieces without services: masks, statements, shares, and every check a site makes."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client_agent.secure_aggregation import (
    PublishedRound,
    check_roster,
    prepare_upload,
    published_masks,
    sign_advertisement,
    sign_statement,
    unmasking_answer,
)
from fedhe.auth import generate_signing_key, public_key_b64
from fedhe.errors import AggregateRefused, InvalidRequest
from fedhe.secagg.keys import AttemptKey
from fedhe.secagg.masks import CoefficientMasks, MaskTerm
from fedhe.secagg.messages import Roster, RosterEntry, Transcript, UploadStatement
from fedhe.secagg.shares import combine_shares, split_seed
from fedhe.secagg.statements import (
    RoundAttempt,
    UploadFacts,
    advertisement,
    positions,
    roster_sha256,
    statement,
)

AT = RoundAttempt("job-" + "1" * 16, 3, 2)
FACTS = UploadFacts(key_id="key-" + "2" * 32, format_id="bfv-packed-v1", num_values=20_000)
T_BITS = 46


@dataclass
class Member:
    site_id: str
    signing: Ed25519PrivateKey
    key: AttemptKey

    @property
    def pinned(self) -> str:
        return public_key_b64(self.signing)


def _members(count: int) -> list[Member]:
    return [
        Member(f"site-{index:016x}", generate_signing_key(), AttemptKey.generate()) for index in range(1, count + 1)
    ]


def _roster(members: list[Member], threshold: int = 2, at: RoundAttempt = AT) -> Roster:
    entries = [
        RosterEntry(
            site_id=m.site_id,
            public_key=m.key.public_key,
            signature=sign_advertisement(m.signing, at, m.site_id, m.key),
        )
        for m in members
    ]
    return Roster(job_id=at.job_id, round=at.round, attempt=at.attempt, threshold=threshold, members=entries)


def _pinned(members: list[Member]) -> dict[str, str]:
    return {m.site_id: m.pinned for m in members}


def _round(
    members: list[Member], threshold: int = 2
) -> tuple[Roster, list[UploadStatement], dict[str, CoefficientMasks]]:
    """Every member prepares and signs an upload (its ciphertext stood in for by its site id)."""
    roster = _roster(members, threshold)
    statements, masks = [], {}
    for m in members:
        prepared = prepare_upload(AT, m.site_id, m.key, roster)
        masks[m.site_id] = prepared.masks
        statements.append(
            sign_statement(
                m.signing,
                AT,
                FACTS,
                me=m.site_id,
                roster=roster,
                prepared=prepared,
                num_samples=100,
                chunks_sha256=statement("chunks", [m.site_id]).hex()[:64].ljust(64, "0"),
            )
        )
    return roster, statements, masks


def test_the_masks_of_a_whole_roster_cancel_to_its_self_masks_and_no_smaller_set_does() -> None:
    members = _members(4)
    _, _, masks = _round(members)
    total = sum(masks[m.site_id].block(0, 3, 8192, T_BITS) for m in members) & np.uint64((1 << T_BITS) - 1)
    # Each member's own masks: its self mask and one pairwise mask per peer.
    assert all(len(masks[m.site_id].terms) == 4 for m in members)
    seeds_known = CoefficientMasks(tuple(t for m in members for t in masks[m.site_id].terms[:1]))
    np.testing.assert_array_equal(total, seeds_known.block(0, 3, 8192, T_BITS))
    partial = sum(masks[m.site_id].block(0, 1, 8192, T_BITS) for m in members[:3]) & np.uint64((1 << T_BITS) - 1)
    selfish = CoefficientMasks(tuple(t for m in members[:3] for t in masks[m.site_id].terms[:1]))
    assert np.mean(partial == selfish.block(0, 1, 8192, T_BITS)) < 0.001


def test_masks_are_uniform_below_t_and_chunks_can_be_made_separately() -> None:
    masks = CoefficientMasks((MaskTerm(os.urandom(32), 1), MaskTerm(os.urandom(32), -1)))
    whole = masks.block(0, 8, 8192, T_BITS)
    assert whole.max() < 2**T_BITS
    assert abs(float(whole.astype(np.float64).mean()) / 2**T_BITS - 0.5) < 0.01
    np.testing.assert_array_equal(whole[5:7], masks.block(5, 2, 8192, T_BITS))
    np.testing.assert_array_equal((whole + masks.negated().block(0, 8, 8192, T_BITS)) & np.uint64(2**T_BITS - 1), 0)


def test_statements_cannot_smuggle_fields_and_signatures_bind_the_attempt() -> None:
    with pytest.raises(InvalidRequest):
        statement("advertise", ["job", "1\nforged"])
    member = _members(1)[0]
    signature = sign_advertisement(member.signing, AT, member.site_id, member.key)
    other = RoundAttempt(AT.job_id, AT.round, AT.attempt + 1)
    assert advertisement(AT, member.site_id, member.key.public_key) != advertisement(
        other, member.site_id, member.key.public_key
    )
    roster = _roster([member], at=other)
    assert roster.members[0].signature != signature


def test_any_t_of_the_shares_rebuild_a_seed_and_t_minus_1_or_a_wrong_one_do_not() -> None:
    seed = os.urandom(16)
    holders = {f"h{i}": i for i in range(1, 6)}
    shares = split_seed(seed, 3, holders, 6)
    assert all(len(share) == 17 for share in shares.values())
    assert combine_shares({holders[h]: shares[h] for h in ("h1", "h3", "h5")}) == seed
    assert combine_shares({holders[h]: shares[h] for h in ("h2", "h4", "h5")}) == seed
    assert combine_shares({holders[h]: shares[h] for h in ("h1", "h2")}) != seed
    wrong = (int.from_bytes(shares["h2"], "big") ^ 1).to_bytes(17, "big")
    assert combine_shares({1: shares["h1"], 2: wrong, 3: shares["h3"]}) != seed


def test_t_minus_1_shares_say_nothing_of_the_seed() -> None:
    """With t = 2 one share is the seed plus a uniform multiple of its x: over many splits of two
    different seeds, the first share's values are spread alike (no bit leans towards the seed)."""

    def first_share_bits(seed: bytes) -> np.ndarray:
        bits = [
            np.unpackbits(np.frombuffer(split_seed(seed, 2, {"h": 1}, 2)["h"], dtype=np.uint8)) for _ in range(2000)
        ]
        return np.mean(bits, axis=0)

    zeros, ones = first_share_bits(bytes(16)), first_share_bits(b"\xff" * 16)
    assert np.max(np.abs(zeros[8:] - ones[8:])) < 0.1  # the top bits of a 130-bit element are rarely set


def test_a_site_refuses_a_roster_it_must_not_mask_against_naming_each_problem() -> None:
    members = _members(4)
    me = members[0]
    roster = _roster(members)
    check_roster(roster, AT, me.site_id, me.key, _pinned(members), min_members=3, threshold=2)
    impostor = Member(members[1].site_id, generate_signing_key(), AttemptKey.generate())  # not the pinned key
    cases = {
        "fewer than 5": (roster, {"min_members": 5}),
        "threshold 3 is not the job's 2": (_roster(members, threshold=3), {}),
        "for another round attempt": (_roster(members, at=RoundAttempt(AT.job_id, AT.round, 9)), {}),
        "does not hold this site's own key": (
            _roster([Member(me.site_id, me.signing, AttemptKey.generate()), *members[1:]]),
            {},
        ),
        "not signed with its pinned key": (_roster([me, impostor, *members[2:]]), {}),
        "not an active member": (_roster([*members, *_members(5)[4:]]), {}),
    }
    for problem, (bad, overrides) in cases.items():
        with pytest.raises(InvalidRequest) as refused:
            check_roster(
                bad, AT, me.site_id, me.key, _pinned(members), **{"min_members": 3, "threshold": 2, **overrides}
            )
        assert refused.value.code == "roster_refused"
        assert problem in refused.value.message


def test_a_site_answers_the_unmasking_only_for_the_whole_roster_it_masked_against() -> None:
    members = _members(4)
    roster, statements, _ = _round(members)
    me, mine = members[0], statements[0]
    full = Transcript(roster=roster, statements=statements)
    answer = unmasking_answer(full, AT, me.site_id, me.key, mine, _pinned(members), FACTS)
    assert set(answer.shares) == {m.site_id for m in members[1:]}
    missing = Transcript(roster=roster, statements=statements[:3])
    with pytest.raises(InvalidRequest, match="exactly one statement per roster member"):
        unmasking_answer(missing, AT, me.site_id, me.key, mine, _pinned(members), FACTS)
    forged = statements[1].model_copy(update={"num_samples": 999})
    with pytest.raises(InvalidRequest, match="is not signed with its pinned key"):
        unmasking_answer(
            Transcript(roster=roster, statements=[mine, forged, *statements[2:]]),
            AT,
            me.site_id,
            me.key,
            mine,
            _pinned(members),
            FACTS,
        )
    other_roster, other_statements, _ = _round(members[:3])
    with pytest.raises(InvalidRequest, match="not the one this site masked against"):
        unmasking_answer(
            Transcript(roster=other_roster, statements=other_statements),
            AT,
            me.site_id,
            me.key,
            mine,
            _pinned(members),
            FACTS,
        )


def _published(members: list[Member], threshold: int = 2) -> tuple[Transcript, dict[str, CoefficientMasks]]:
    roster, statements, masks = _round(members, threshold)
    seeds = {}
    for owner in members:
        shares = {}
        for holder in members:
            if holder is owner:
                continue
            transcript = Transcript(roster=roster, statements=statements)
            mine = next(s for s in statements if s.site_id == holder.site_id)
            answer = unmasking_answer(transcript, AT, holder.site_id, holder.key, mine, _pinned(members), FACTS)
            shares[positions(roster)[holder.site_id]] = base64.b64decode(answer.shares[owner.site_id])
        seeds[owner.site_id] = base64.b64encode(combine_shares(dict(list(shares.items())[:threshold]))).decode()
    return Transcript(roster=roster, statements=statements, self_mask_seeds=seeds), masks


def test_the_published_seeds_remove_exactly_the_self_masks() -> None:
    members = _members(3)
    transcript, masks = _published(members)
    own = PublishedRound(mine=transcript.statements[0], answered_attempt=AT.attempt)
    removal = published_masks(
        transcript, AT, members[0].site_id, own, _pinned(members), FACTS, min_statements=3, total_samples=300
    )
    total = sum(masks[m.site_id].block(0, 2, 8192, T_BITS) for m in members) + removal.block(0, 2, 8192, T_BITS)
    np.testing.assert_array_equal(total & np.uint64(2**T_BITS - 1), 0)


@pytest.mark.parametrize(
    ("tamper", "says"),
    [
        (lambda t: t.model_copy(update={"statements": t.statements[:1]}), "fewer than 3"),
        (lambda t: t, "its total_samples is not the sum of the signed n_k"),
        (
            lambda t: t.model_copy(
                update={
                    "self_mask_seeds": {
                        **t.self_mask_seeds,
                        t.statements[1].site_id: base64.b64encode(os.urandom(16)).decode(),
                    }
                }
            ),
            "published seed is not the one it committed to",
        ),
        (lambda t: t.model_copy(update={"self_mask_seeds": {}}), "does not publish every member's self-mask seed"),
        (
            lambda t: t.model_copy(update={"roster": t.roster.model_copy(update={"round": 2})}),
            "for another round attempt",
        ),
    ],
)
def test_a_published_aggregate_whose_transcript_proves_no_honest_sum_is_refused(tamper: object, says: str) -> None:
    members = _members(3)
    transcript, _ = _published(members)
    total = 300 if "total_samples" not in says else 600
    with pytest.raises(AggregateRefused) as refused:
        published_masks(
            tamper(transcript),  # type: ignore[operator]
            AT,
            members[0].site_id,
            PublishedRound(mine=None, answered_attempt=None),
            _pinned(members),
            FACTS,
            min_statements=3,
            total_samples=total,
        )
    assert says in refused.value.message


def test_a_site_refuses_the_aggregate_of_an_attempt_it_did_not_answer_or_that_lacks_its_upload() -> None:
    members = _members(3)
    transcript, _ = _published(members)
    mine = transcript.statements[0].model_copy(update={"chunks_sha256": "f" * 64})
    for own, says in [
        (PublishedRound(mine=None, answered_attempt=AT.attempt - 1), "answered attempt 1's unmasking"),
        (PublishedRound(mine=mine, answered_attempt=AT.attempt), "its upload is not in the sum"),
    ]:
        with pytest.raises(AggregateRefused, match=says):
            published_masks(
                transcript, AT, members[0].site_id, own, _pinned(members), FACTS, min_statements=3, total_samples=300
            )


def test_a_share_sealed_for_one_holder_opens_for_no_one_else_and_not_in_another_attempt() -> None:
    a, b, c = _members(3)
    pair = a.key.pair_keys(AT, a.site_id, b.site_id, b.key.public_key)
    sealed = pair.seal(AT, a.site_id, b.site_id, b"s" * 16)
    assert (
        b.key.pair_keys(AT, b.site_id, a.site_id, a.key.public_key).open(AT, a.site_id, b.site_id, sealed) == b"s" * 16
    )
    with pytest.raises(InvalidRequest):
        c.key.pair_keys(AT, c.site_id, a.site_id, a.key.public_key).open(AT, a.site_id, b.site_id, sealed)
    with pytest.raises(InvalidRequest):
        pair.open(RoundAttempt(AT.job_id, AT.round, AT.attempt + 1), a.site_id, b.site_id, sealed)


def test_the_roster_hash_covers_the_threshold_and_every_members_key() -> None:
    members = _members(3)
    base = roster_sha256(_roster(members))
    assert roster_sha256(_roster(members, threshold=3)) != base
    swapped = Member(members[2].site_id, members[2].signing, AttemptKey.generate())
    assert roster_sha256(_roster([*members[:2], swapped])) != base
