"""Keyserver domain logic: federations, membership, key rotation and key release.

The keyserver decides alone who may hold a federation's secret key. Its own membership table
pins each member's Ed25519 public key; it changes only by the keyserver's admin accounts, or,
for a federation with an endorsement rule, by the signatures of k existing members. Nothing the
aggregator says (its site registry, its operators' credentials) can add a member.

A signed request speaks for the site it names only once its signature verified: until then it
is the client address's, so it is limited per address (by the routes) and only a verified one
spends its site's budget or is recorded under the site; refusals are audited by the routes'
error handlers (``fedhe.refusals``) with the named site as a claim.
"""

from __future__ import annotations

from fedhe.auth import ENDORSE_PURPOSE, KEY_RELEASE_PURPOSE, PINNED_KEYS_PURPOSE, parse_public_key, verify_request
from fedhe.db import SessionFactory, utcnow
from fedhe.errors import Conflict, NotFound, PermissionDenied, Unauthenticated
from fedhe.he.context import BfvParameters, CkksParameters, create_key_material, parameters_from
from fedhe.identifiers import new_id
from fedhe.ratelimit import RateLimiter
from fedhe.refusals import Requester
from fedhe.schemas import (
    AuditEventPublic,
    ContextInfo,
    EndorsementCreate,
    FederationCreate,
    FederationKeys,
    FederationPublic,
    KeyReleaseRequest,
    MemberCreate,
    MemberPublic,
    MemberStatus,
    PinnedKey,
    PinnedKeysRequest,
    SignedRequest,
)
from keyserver.metrics import KeyserverMetrics
from keyserver.nonces import NonceStore
from keyserver.repository import KeyserverRepository
from keyserver.sealing import SecretSealer
from keyserver.tables import ContextRow, EndorsementRow, FederationRow, MemberRow

SIGNED_PER_SITE = "signed-requests-per-site"


def _context_info(row: ContextRow) -> ContextInfo:
    return ContextInfo(
        key_id=row.key_id,
        federation_id=row.federation_id,
        parameters=parameters_from(row.parameters),
        created_at=row.created_at,
        retired_at=row.retired_at,
    )


def _member_public(row: MemberRow, endorsed_by: list[str]) -> MemberPublic:
    return MemberPublic(
        federation_id=row.federation_id,
        site_id=row.site_id,
        name=row.name,
        public_key=row.public_key,
        status=MemberStatus(row.status),
        proposed_at=row.proposed_at,
        admitted_at=row.admitted_at,
        revoked_at=row.revoked_at,
        endorsed_by=endorsed_by,
    )


def _one_member_public(repo: KeyserverRepository, row: MemberRow) -> MemberPublic:
    endorsements = repo.endorsements(row.federation_id, row.site_id, row.public_key)
    return _member_public(row, [e.endorser_site_id for e in endorsements])


class KeyService:
    """Creates contexts, keeps their secrets sealed, keeps the membership, and releases keys to members."""

    def __init__(
        self,
        sessions: SessionFactory,
        sealer: SecretSealer,
        nonces: NonceStore,
        *,
        audience: str,
        max_skew_s: int,
        metrics: KeyserverMetrics,
        limiter: RateLimiter,
    ):
        self._metrics = metrics
        self._limiter = limiter
        self._sessions = sessions
        self._sealer = sealer
        self._nonces = nonces
        self.audience = audience
        self._max_skew_s = max_skew_s

    def _new_context(self, federation_id: str, parameters: CkksParameters | BfvParameters) -> ContextRow:
        key_id = new_id("key")
        material = create_key_material(parameters)
        return ContextRow(
            key_id=key_id,
            federation_id=federation_id,
            parameters=parameters.model_dump(),
            sealed_secret_context=self._sealer.seal(key_id, material.secret_context),
            kek_fingerprint=self._sealer.fingerprint,
            evaluation_context=material.evaluation_context,
        )

    def _public(self, repo: KeyserverRepository, federation: FederationRow) -> FederationPublic:
        return FederationPublic(
            id=federation.id,
            name=federation.name,
            key_id=federation.current_key_id,
            created_at=federation.created_at,
            endorsements_required=federation.endorsements_required,
            bootstrap_complete=federation.bootstrap_complete,
            contexts=[_context_info(row) for row in repo.contexts_of(federation.id)],
        )

    def create_federation(self, request: FederationCreate, *, actor: str) -> FederationPublic:
        """Create a federation with a fresh HE context and its admission rule."""
        federation_id = new_id("fed")
        context = self._new_context(federation_id, request.parameters)
        with self._sessions.transaction() as session:
            repo = KeyserverRepository(session)
            federation = FederationRow(
                id=federation_id,
                name=request.name,
                current_key_id=context.key_id,
                endorsements_required=request.endorsements_required,
                bootstrap_complete=False,
            )
            repo.add_federation(federation, context)
            repo.audit(
                actor=actor,
                action="federation.create",
                subject=federation_id,
                detail={"key_id": context.key_id, "endorsements_required": request.endorsements_required},
            )
            session.flush()
            return self._public(repo, federation)

    def rotate_key(self, federation_id: str, *, actor: str) -> FederationPublic:
        """Retire the federation's current context and make a new one with the same parameters."""
        with self._sessions.transaction() as session:
            repo = KeyserverRepository(session)
            federation = repo.federation(federation_id)
            old = repo.context(federation.current_key_id)
            new = self._new_context(federation_id, parameters_from(old.parameters))
            old.retired_at = utcnow()
            repo.add_context(new)
            federation.current_key_id = new.key_id
            repo.audit(
                actor=actor,
                action="federation.rotate",
                subject=federation_id,
                detail={"old": old.key_id, "new": new.key_id},
            )
            session.flush()
            return self._public(repo, federation)

    def federation(self, federation_id: str) -> FederationPublic:
        """One federation."""
        with self._sessions.transaction() as session:
            repo = KeyserverRepository(session)
            return self._public(repo, repo.federation(federation_id))

    def federations(self) -> list[FederationPublic]:
        """All federations."""
        with self._sessions.transaction() as session:
            repo = KeyserverRepository(session)
            return [self._public(repo, row) for row in repo.federations()]

    def context_info(self, key_id: str) -> ContextInfo:
        """Public facts about a context."""
        with self._sessions.transaction() as session:
            return _context_info(KeyserverRepository(session).context(key_id))

    def evaluation_context(self, key_id: str, *, actor: str) -> bytes:
        """The keyless context for the aggregator."""
        with self._sessions.transaction() as session:
            repo = KeyserverRepository(session)
            row = repo.context(key_id)
            if row.retired_at is not None:
                raise Conflict(f"key {key_id} was retired; use the federation's current key", code="stale_key_id")
            repo.audit(actor=actor, action="context.release_evaluation", subject=key_id)
            return row.evaluation_context

    def audit_events(self, limit: int) -> list[AuditEventPublic]:
        """The newest audit events (federations, members, rotations, every key release granted or refused)."""
        with self._sessions.transaction() as session:
            return [AuditEventPublic.model_validate(row) for row in KeyserverRepository(session).audit_events(limit)]

    # ---- membership -------------------------------------------------------------------------

    @staticmethod
    def _admit(repo: KeyserverRepository, federation: FederationRow, member: MemberRow) -> None:
        member.status = MemberStatus.ACTIVE.value
        member.admitted_at = utcnow()
        repo.session.flush()
        if (
            federation.endorsements_required > 0
            and not federation.bootstrap_complete
            and repo.count_active_members(federation.id) >= federation.endorsements_required
        ):
            federation.bootstrap_complete = True

    def add_member(self, federation_id: str, request: MemberCreate, *, actor: str) -> MemberPublic:
        """Propose a site as a member, pinning its public key; admitted at once unless endorsements are due.

        Endorsements are due once the federation has had ``endorsements_required`` active members
        (before that, the founding members are admitted by the keyserver admin alone).
        """
        parse_public_key(request.public_key)
        with self._sessions.transaction() as session:
            repo = KeyserverRepository(session)
            federation = repo.federation(federation_id, for_update=True)
            if repo.member(federation_id, request.site_id) is not None:
                raise Conflict(f"{request.site_id} already has a membership in {federation_id}", code="member_exists")
            member = MemberRow(
                federation_id=federation_id,
                site_id=request.site_id,
                name=request.name,
                public_key=request.public_key,
                status=MemberStatus.PROPOSED.value,
                proposed_by=actor,
                proposed_at=utcnow(),
            )
            repo.add(member)
            admitted = federation.endorsements_required == 0 or not federation.bootstrap_complete
            if admitted:
                self._admit(repo, federation, member)
            repo.audit(
                actor=actor,
                action="member.admit" if admitted else "member.propose",
                subject=f"{federation_id}/{request.site_id}",
                detail={"public_key": request.public_key, "policy": "admin" if admitted else "endorsements"},
            )
            return _one_member_public(repo, member)

    def endorse(
        self, federation_id: str, candidate: str, request: EndorsementCreate, requester: Requester
    ) -> MemberPublic:
        """Record an active member's signature over a proposed member's pinned key; admit at k."""
        actor = f"site:{request.site_id}"
        with self._sessions.transaction() as session:
            repo = KeyserverRepository(session)
            federation = repo.federation(federation_id, for_update=True)
            endorser = repo.member(federation_id, request.site_id)
            if endorser is None or endorser.status != MemberStatus.ACTIVE.value:
                raise PermissionDenied("only an active member may endorse", code="not_a_member")
            member = repo.member(federation_id, candidate)
            # The signature covers the key the endorser was shown; verify it before saying anything
            # about the candidate, so only a member learns who is proposed.
            pinned = member.public_key if member is not None else ""
            self._verify(endorser.public_key, ENDORSE_PURPOSE, [federation_id, candidate, pinned], request, requester)
            if member is None or member.status != MemberStatus.PROPOSED.value:
                raise Conflict(f"{candidate} is not a proposed member of {federation_id}", code="not_proposed")
            if repo.endorsement(federation_id, candidate, request.site_id, member.public_key) is not None:
                raise Conflict(f"{request.site_id} already endorsed {candidate}", code="duplicate_endorsement")
            repo.add(
                EndorsementRow(
                    federation_id=federation_id,
                    site_id=candidate,
                    endorser_site_id=request.site_id,
                    public_key=member.public_key,
                    signature=request.signature,
                )
            )
            repo.session.flush()
            count = len(repo.endorsements(federation_id, candidate, member.public_key))
            repo.audit(
                actor=actor,
                action="member.endorse",
                subject=f"{federation_id}/{candidate}",
                detail={"endorsements": count, "required": federation.endorsements_required},
            )
            if count >= federation.endorsements_required:
                self._admit(repo, federation, member)
                repo.audit(
                    actor=actor,
                    action="member.admit",
                    subject=f"{federation_id}/{candidate}",
                    detail={"public_key": member.public_key, "policy": "endorsements", "endorsements": count},
                )
            return _one_member_public(repo, member)

    def revoke_member(self, federation_id: str, site_id: str, *, actor: str) -> MemberPublic:
        """Revoke a membership: the site gets no key of this federation from now on."""
        with self._sessions.transaction() as session:
            repo = KeyserverRepository(session)
            member = repo.member(federation_id, site_id)
            if member is None:
                raise NotFound(f"{site_id} is not a member of {federation_id}")
            if member.status == MemberStatus.REVOKED.value:
                raise Conflict(f"{site_id} is already revoked", code="member_revoked")
            member.status = MemberStatus.REVOKED.value
            member.revoked_at = utcnow()
            repo.audit(actor=actor, action="member.revoke", subject=f"{federation_id}/{site_id}")
            return _one_member_public(repo, member)

    def members(self, federation_id: str) -> list[MemberPublic]:
        """A federation's members in every state."""
        with self._sessions.transaction() as session:
            repo = KeyserverRepository(session)
            repo.federation(federation_id)
            return [_member_public(row, endorsed_by) for row, endorsed_by in repo.members_with_endorsers(federation_id)]

    # ---- key release ------------------------------------------------------------------------

    def _verify(
        self, public_key: str, purpose: str, fields: list[str], request: SignedRequest, requester: Requester
    ) -> None:
        """Check ``request``'s signature, freshness and single use; from then on it is the site's."""
        verify_request(
            public_key,
            purpose,
            self.audience,
            fields,
            timestamp=request.timestamp,
            nonce=request.nonce,
            signature=request.signature,
            max_skew_s=self._max_skew_s,
        )
        if not self._nonces.claim(request.nonce, 2 * self._max_skew_s):
            raise Unauthenticated("this signed request was already used", code="replayed_request")
        requester.actor = f"site:{request.site_id}"
        self._limiter.hit(SIGNED_PER_SITE, request.site_id)

    def _active_member_of_key(
        self, repo: KeyserverRepository, key_id: str, purpose: str, request: SignedRequest, requester: Requester
    ) -> ContextRow:
        """The context ``key_id``, if ``request`` is a fresh signature by an active member of its federation."""
        row = repo.find_context(key_id)
        member = repo.member(row.federation_id, request.site_id) if row is not None else None
        if row is None or member is None or member.status != MemberStatus.ACTIVE.value:
            # One answer for an unknown key, a non-member and a revoked member: the route
            # does not reveal which keys exist or who belongs to which federation.
            raise PermissionDenied("site is not an active member of this key's federation", code="not_a_member")
        self._verify(member.public_key, purpose, [key_id], request, requester)
        return row

    def release_secret_context(self, key_id: str, request: KeyReleaseRequest, requester: Requester) -> bytes:
        """The secret context, for an active member that signed a fresh, single-use request for it
        (audited; a refusal is audited by the route's error handler)."""
        with self._sessions.transaction() as session:
            repo = KeyserverRepository(session)
            row = self._active_member_of_key(repo, key_id, KEY_RELEASE_PURPOSE, request, requester)
            if row.retired_at is not None:
                raise Conflict(f"key {key_id} was retired; fetch the federation's current key", code="stale_key_id")
            secret = self._sealer.unseal(key_id, row.sealed_secret_context)
            repo.audit(
                actor=f"site:{request.site_id}",
                action="context.release_secret",
                subject=key_id,
                detail={"granted": True, "federation_id": row.federation_id},
            )
        self._metrics.release("granted")
        return secret

    def pinned_keys(self, key_id: str, request: PinnedKeysRequest, requester: Requester) -> FederationKeys:
        """The pinned keys of the active members of ``key_id``'s federation, for one of them.

        Sites check every signature a secure round carries against these (ADR 0010), never
        against anything the coordinator says. Refusals are audited like key releases.
        """
        with self._sessions.transaction() as session:
            repo = KeyserverRepository(session)
            row = self._active_member_of_key(repo, key_id, PINNED_KEYS_PURPOSE, request, requester)
            members = [
                PinnedKey(site_id=member.site_id, public_key=member.public_key, status=member.status)
                for member, _ in repo.members_with_endorsers(row.federation_id)
                if member.admitted_at is not None
            ]
            repo.audit(
                actor=f"site:{request.site_id}",
                action="members.pinned_keys",
                subject=key_id,
                detail={"granted": True, "federation_id": row.federation_id, "members": len(members)},
            )
        return FederationKeys(federation_id=row.federation_id, key_id=key_id, members=members)
