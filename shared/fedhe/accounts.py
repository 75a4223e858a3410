"""Named accounts with roles, and the API tokens that authenticate them.

Every credential belongs to a named actor: a person (role ``admin`` or ``viewer``) or a
service identity (role ``service``, e.g. the aggregator calling the keyserver). Each service
keeps its own accounts in its own database, so the keyserver's admin credential and the
aggregator's are different credentials held by different people.

Tokens are ``fht_`` plus 256 random bits. A service stores only the token's SHA-256 (a slow
hash adds nothing for tokens with that much entropy), looks a presented token up by that digest
and compares the digests in constant time. Tokens expire and can be revoked; disabling an
account revokes all its tokens.
"""

from __future__ import annotations

import enum
import hmac
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ForeignKey, String, select
from sqlalchemy.orm import Mapped, Session, declared_attr, mapped_column

from fedhe.auth import hash_token, new_token
from fedhe.db import AuditingRepository, UTCDateTime, utcnow
from fedhe.errors import Conflict, InvalidRequest, NotFound, Unauthenticated
from fedhe.identifiers import new_id
from fedhe.schemas import AccountCreate, AccountPublic, TokenCreate, TokenIssued, TokenPublic

TOKEN_PREFIX = "fht_"  # noqa: S105 (a prefix that marks the kind of credential, not a secret)
MIN_BOOTSTRAP_TOKEN_LENGTH = 32
# last_used_at is informational; writing it on every request would turn each read into a write.
_LAST_USED_RESOLUTION = timedelta(minutes=1)


class Role(enum.StrEnum):
    """What an account may do. Each service decides which roles it has and what each may call."""

    ADMIN = "admin"
    VIEWER = "viewer"
    SERVICE = "service"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: an account (person or service) or a site."""

    role: str
    name: str
    site_id: str | None = None

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return f"site:{self.site_id}" if self.site_id else f"account:{self.name}"


class AccountColumns:
    """Columns of a service's ``accounts`` table."""

    __tablename__ = "accounts"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ApiTokenColumns:
    """Columns of a service's ``api_tokens`` table (only the SHA-256 of each token is kept)."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)

    @declared_attr
    def account(cls) -> Mapped[str]:  # noqa: N805 (SQLAlchemy declared_attr takes the class)
        return mapped_column(ForeignKey("accounts.name"), index=True)

    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


def account_public(row: AccountColumns) -> AccountPublic:
    """An account as admins see it."""
    return AccountPublic(
        name=row.name, role=row.role, created_at=row.created_at, created_by=row.created_by, disabled_at=row.disabled_at
    )


def token_public(row: ApiTokenColumns) -> TokenPublic:
    """A token's metadata (never the token)."""
    return TokenPublic(
        id=row.id,
        account=row.account,
        label=row.label,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
    )


class AccountRepository:
    """Account and token rows of one service, within one session."""

    def __init__(self, session: Session, account_row: type[AccountColumns], token_row: type[ApiTokenColumns]) -> None:
        self.session = session
        self._account_row = account_row
        self._token_row = token_row

    def account(self, name: str) -> AccountColumns:
        """The account, or ``NotFound``."""
        row = self.session.get(self._account_row, name)
        if row is None:
            raise NotFound(f"no account {name!r}")
        return row

    def find_account(self, name: str) -> AccountColumns | None:
        """The account, if it exists."""
        return self.session.get(self._account_row, name)

    def accounts(self) -> list[AccountColumns]:
        """All accounts by name."""
        return list(self.session.scalars(select(self._account_row).order_by(self._account_row.name)))

    def add_account(self, name: str, role: str, created_by: str) -> AccountColumns:
        """Stage a new account."""
        row = self._account_row()
        row.name, row.role, row.created_by, row.created_at = name, role, created_by, utcnow()
        self.session.add(row)
        self.session.flush()
        return row

    def add_token(self, account: str, token: str, label: str, expires_at: datetime | None) -> ApiTokenColumns:
        """Stage a token (stored as its SHA-256 only)."""
        row = self._token_row()
        row.id, row.account, row.sha256, row.label = new_id("tok"), account, hash_token(token), label
        row.created_at, row.expires_at = utcnow(), expires_at
        self.session.add(row)
        self.session.flush()
        return row

    def token(self, token_id: str) -> ApiTokenColumns:
        """The token row, or ``NotFound``."""
        row = self.session.get(self._token_row, token_id)
        if row is None:
            raise NotFound(f"no token {token_id!r}")
        return row

    def token_by_digest(self, digest: str) -> ApiTokenColumns | None:
        """The token whose SHA-256 is ``digest``."""
        return self.session.scalars(select(self._token_row).where(self._token_row.sha256 == digest)).first()

    def tokens_of(self, account: str) -> list[ApiTokenColumns]:
        """An account's tokens, newest first."""
        query = (
            select(self._token_row)
            .where(self._token_row.account == account)
            .order_by(self._token_row.created_at.desc())
        )
        return list(self.session.scalars(query))


class AccountService:
    """Accounts, tokens and authentication for one service.

    ``roles`` are the roles this service has; ``audit`` opens the service's auditing repository
    on a session, so every change is audited in its own transaction under the acting name.
    """

    def __init__(
        self,
        sessions: Any,
        account_row: type[AccountColumns],
        token_row: type[ApiTokenColumns],
        roles: frozenset[Role],
        audit: Any,
    ) -> None:
        self._sessions = sessions
        self._account_row = account_row
        self._token_row = token_row
        self.roles = roles
        self._audit = audit

    def _repos(self, session: Session) -> tuple[AccountRepository, AuditingRepository]:
        return AccountRepository(session, self._account_row, self._token_row), self._audit(session)

    def authenticate(self, token: str) -> Principal:
        """The account a presented token belongs to; ``Unauthenticated`` if it is not a live token."""
        digest = hash_token(token)
        with self._sessions.transaction() as session:
            repo, _ = self._repos(session)
            row = repo.token_by_digest(digest)
            if row is None or not hmac.compare_digest(row.sha256, digest):
                raise Unauthenticated("credential is not valid")
            now = utcnow()
            if row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= now):
                raise Unauthenticated("credential has expired or was revoked", code="credential_expired")
            account = repo.account(row.account)
            if account.disabled_at is not None:
                raise Unauthenticated("the account of this credential is disabled", code="credential_expired")
            if row.last_used_at is None or now - row.last_used_at > _LAST_USED_RESOLUTION:
                row.last_used_at = now
            return Principal(role=account.role, name=account.name)

    def create_account(self, request: AccountCreate, *, actor: str) -> AccountPublic:
        """Create an account with one of this service's roles."""
        if request.role not in self.roles:
            raise InvalidRequest(
                f"this service has no role {request.role!r}",
                code="unknown_role",
                detail={"roles": sorted(self.roles)},
            )
        with self._sessions.transaction() as session:
            repo, audit = self._repos(session)
            if repo.find_account(request.name) is not None:
                raise Conflict(f"account {request.name!r} exists", code="account_exists")
            row = repo.add_account(request.name, request.role, actor)
            audit.audit(actor=actor, action="account.create", subject=request.name, detail={"role": request.role})
            return account_public(row)

    def accounts(self) -> list[AccountPublic]:
        """All accounts."""
        with self._sessions.transaction() as session:
            repo, _ = self._repos(session)
            return [account_public(row) for row in repo.accounts()]

    def disable_account(self, name: str, *, actor: str) -> AccountPublic:
        """Disable an account and revoke every token it holds."""
        with self._sessions.transaction() as session:
            repo, audit = self._repos(session)
            row = repo.account(name)
            now = utcnow()
            if row.disabled_at is None:
                row.disabled_at = now
            for token in repo.tokens_of(name):
                if token.revoked_at is None:
                    token.revoked_at = now
            audit.audit(actor=actor, action="account.disable", subject=name)
            return account_public(row)

    def token_owner(self, token_id: str) -> str | None:
        """The account a token belongs to, if the token exists."""
        with self._sessions.transaction() as session:
            row = session.get(self._token_row, token_id)
            return None if row is None else row.account

    def issue_token(self, account: str, request: TokenCreate, *, caller: Principal) -> TokenIssued:
        """A new token for ``account``; shown once. Routes let only an admin or the account itself call this."""
        token = new_token(TOKEN_PREFIX)
        expires_at = utcnow() + timedelta(days=request.expires_in_days)
        with self._sessions.transaction() as session:
            repo, audit = self._repos(session)
            if repo.account(account).disabled_at is not None:
                raise Conflict(f"account {account!r} is disabled", code="account_disabled")
            row = repo.add_token(account, token, request.label, expires_at)
            audit.audit(
                actor=caller.actor,
                action="token.issue",
                subject=row.id,
                detail={"account": account, "expires_at": expires_at.isoformat()},
            )
            return TokenIssued(token=token, info=token_public(row))

    def issue_session(self, caller: Principal, hours: int) -> TokenIssued:
        """A short-lived token for the caller's own account (the dashboard keeps this, not the API token)."""
        token = new_token(TOKEN_PREFIX)
        expires_at = utcnow() + timedelta(hours=hours)
        with self._sessions.transaction() as session:
            repo, audit = self._repos(session)
            row = repo.add_token(caller.name, token, "dashboard session", expires_at)
            audit.audit(actor=caller.actor, action="session.start", subject=row.id, detail={"hours": hours})
            return TokenIssued(token=token, info=token_public(row))

    def tokens(self, account: str) -> list[TokenPublic]:
        """An account's tokens (metadata only)."""
        with self._sessions.transaction() as session:
            repo, _ = self._repos(session)
            repo.account(account)
            return [token_public(row) for row in repo.tokens_of(account)]

    def revoke_token(self, token_id: str, *, caller: Principal) -> TokenPublic:
        """Revoke a token at once (an admin, or the token's owner)."""
        with self._sessions.transaction() as session:
            repo, audit = self._repos(session)
            row = repo.token(token_id)
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            audit.audit(actor=caller.actor, action="token.revoke", subject=token_id, detail={"account": row.account})
            return token_public(row)

    def ensure_bootstrap(self, name: str, role: Role, token: str) -> None:
        """Register an installer-provided token for account ``name`` once (first start, or a new token).

        A token that was revoked stays revoked: the same value is never registered again.
        """
        if len(token) < MIN_BOOTSTRAP_TOKEN_LENGTH:
            raise InvalidRequest(
                f"the bootstrap token for {name!r} must have at least {MIN_BOOTSTRAP_TOKEN_LENGTH} chars"
            )
        with self._sessions.transaction() as session:
            repo, audit = self._repos(session)
            if repo.token_by_digest(hash_token(token)) is not None:
                return
            account = repo.find_account(name)
            if account is None:
                repo.add_account(name, role.value, "bootstrap")
                audit.audit(actor="bootstrap", action="account.create", subject=name, detail={"role": role.value})
            elif account.role != role.value:
                raise Conflict(f"account {name!r} exists with role {account.role}, not {role.value}")
            row = repo.add_token(name, token, "installed from settings", None)
            audit.audit(actor="bootstrap", action="token.issue", subject=row.id, detail={"account": name})
