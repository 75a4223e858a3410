"""Who is calling: bearer tokens resolved to a named principal, and role checks for routes.

A service puts an ``Authenticator`` in ``app.state.authenticator``; routes declare what they
need with ``allow(...)``. Failed authentications are counted per client address and refused
with 429 once the budget is spent, so tokens cannot be guessed at speed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Header, Request

from fedhe.accounts import AccountService, Principal
from fedhe.auth import SITE_CREDENTIAL_PREFIX, bearer_token
from fedhe.errors import PermissionDenied, Unauthenticated
from fedhe.http_limits import AUTH_FAILURES, client_address
from fedhe.ratelimit import RateLimiter

SiteResolver = Callable[[str], Principal]


class Authenticator:
    """Turns a presented credential into a ``Principal``: an account's token, or a site credential."""

    def __init__(self, accounts: AccountService, limiter: RateLimiter, sites: SiteResolver | None = None):
        self.accounts = accounts
        self._limiter = limiter
        self._sites = sites

    def principal(self, address: str, authorization: str | None) -> Principal:
        """The caller, or ``Unauthenticated`` (counted against the address's failure budget)."""
        self._limiter.check(AUTH_FAILURES, address)
        try:
            token = bearer_token(authorization)
            if self._sites is not None and token.startswith(SITE_CREDENTIAL_PREFIX):
                return self._sites(token)
            return self.accounts.authenticate(token)
        except Unauthenticated:
            self._limiter.hit(AUTH_FAILURES, address)
            raise


def authenticated(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    """Dependency: the authenticated caller of this request."""
    authenticator: Authenticator = request.app.state.authenticator
    return authenticator.principal(client_address(request), authorization)


def allow(*roles: str) -> Any:
    """Dependency: the caller, if its role is one of ``roles``; else 403 naming what is needed."""

    def check(caller: Annotated[Principal, Depends(authenticated)]) -> Principal:
        if caller.role not in roles:
            raise PermissionDenied(f"this needs one of the roles: {', '.join(roles)}", code="forbidden_role")
        return caller

    return Depends(check)
