"""Keyserver domain logic: federations, key rotation and role-checked key release."""

from __future__ import annotations

import uuid
from typing import Protocol

from fedhe.auth import verify_key_release
from fedhe.db import SessionFactory, utcnow
from fedhe.errors import Conflict, NotFound, PermissionDenied
from fedhe.he.context import CkksParameters, create_key_material
from fedhe.schemas import (
    AuditEventPublic,
    ContextInfo,
    FederationCreate,
    FederationPublic,
    KeyReleaseRequest,
    SiteIdentity,
    SiteStatus,
)
from keyserver.repository import KeyserverRepository
from keyserver.sealing import SecretSealer
from keyserver.tables import ContextRow, FederationRow


class SiteDirectory(Protocol):
    """Where the keyserver learns a site's status and public key (the aggregator's registry)."""

    def site_identity(self, site_id: str) -> SiteIdentity:
        """The site's registry entry; raises ``NotFound`` for an unknown site."""
        ...


def _context_info(row: ContextRow) -> ContextInfo:
    return ContextInfo(
        key_id=row.key_id,
        federation_id=row.federation_id,
        parameters=CkksParameters.model_validate(row.parameters),
        created_at=row.created_at,
        retired_at=row.retired_at,
    )


class KeyService:
    """Creates contexts, keeps their secrets sealed, and hands each role only its part."""

    def __init__(self, sessions: SessionFactory, sealer: SecretSealer, sites: SiteDirectory, max_skew_s: int):
        self._sessions = sessions
        self._sealer = sealer
        self._sites = sites
        self._max_skew_s = max_skew_s

    def _new_context(self, federation_id: str, parameters: CkksParameters) -> ContextRow:
        key_id = "key-" + uuid.uuid4().hex
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
            contexts=[_context_info(row) for row in repo.contexts_of(federation.id)],
        )

    def create_federation(self, request: FederationCreate, *, actor: str) -> FederationPublic:
        """Create a federation with a fresh CKKS context."""
        federation_id = "fed-" + uuid.uuid4().hex[:16]
        context = self._new_context(federation_id, request.parameters)
        with self._sessions.transaction() as session:
            repo = KeyserverRepository(session)
            federation = FederationRow(id=federation_id, name=request.name, current_key_id=context.key_id)
            repo.add_federation(federation, context)
            repo.audit(
                actor=actor, action="federation.create", subject=federation_id, detail={"key_id": context.key_id}
            )
            session.flush()
            return self._public(repo, federation)

    def rotate_key(self, federation_id: str, *, actor: str) -> FederationPublic:
        """Retire the federation's current context and make a new one with the same parameters."""
        with self._sessions.transaction() as session:
            repo = KeyserverRepository(session)
            federation = repo.federation(federation_id)
            old = repo.context(federation.current_key_id)
            new = self._new_context(federation_id, CkksParameters.model_validate(old.parameters))
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
        """The newest audit events (federations, rotations, every key release granted or refused)."""
        with self._sessions.transaction() as session:
            return [AuditEventPublic.model_validate(row) for row in KeyserverRepository(session).audit_events(limit)]

    def release_secret_context(self, key_id: str, request: KeyReleaseRequest) -> bytes:
        """The secret context, for an approved site that signed a fresh request for it.

        Every attempt, granted or refused, is audited.
        """
        actor = f"site:{request.site_id}"
        try:
            try:
                identity = self._sites.site_identity(request.site_id)
            except NotFound as exc:
                # Same answer as for a pending site, so the endpoint does not reveal which ids exist.
                raise PermissionDenied("site is not approved", code="site_not_approved") from exc
            if identity.status != SiteStatus.APPROVED:
                raise PermissionDenied(f"site is {identity.status.value}, not approved", code="site_not_approved")
            verify_key_release(
                identity.public_key,
                request.site_id,
                key_id,
                request.timestamp,
                request.signature,
                max_skew_s=self._max_skew_s,
            )
            with self._sessions.transaction() as session:
                repo = KeyserverRepository(session)
                row = repo.context(key_id)
                if row.retired_at is not None:
                    raise Conflict(f"key {key_id} was retired; fetch the federation's current key", code="stale_key_id")
                secret = self._sealer.unseal(key_id, row.sealed_secret_context)
                repo.audit(actor=actor, action="context.release_secret", subject=key_id, detail={"granted": True})
                return secret
        except Exception as exc:
            with self._sessions.transaction() as session:
                KeyserverRepository(session).audit(
                    actor=actor,
                    action="context.release_secret",
                    subject=key_id,
                    detail={"granted": False, "reason": getattr(exc, "code", type(exc).__name__)},
                )
            raise
