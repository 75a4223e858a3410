"""Who is calling: bearer tokens resolved to a named principal, and role checks for routes.

A service puts an ``Authenticator`` in ``app.state.authenticator``; routes declare what they
need with ``allow(...)``. Failed authentications are counted per client address and per
presented credential, and answered with 429 instead of 401 once either budget is spent. Only
failures are counted and a credential is always checked, so a valid credential is never
refused because others failed from its address (the per-address request budget of
``fedhe.http_limits`` still applies to everyone there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Header, Request

from fedhe.accounts import AccountService, Principal
from fedhe.auth import SITE_CREDENTIAL_PREFIX, bearer_token
from fedhe.errors import PermissionDenied, Unauthenticated
from fedhe.http_limits import AUTH_FAILURES, AUTH_FAILURES_PER_CREDENTIAL, client_address
from fedhe.ratelimit import RateLimiter, too_many
from fedhe.refusals import requester_of

SiteResolver = Callable[[str], Principal]


class Authenticator:
    """Turns a presented credential into a ``Principal``: an account's token, or a site credential."""

    def __init__(self, accounts: AccountService, limiter: RateLimiter, sites: SiteResolver | None = None):
        self.accounts = accounts
        self._limiter = limiter
        self._sites = sites

    def principal(self, address: str, authorization: str | None) -> Principal:
        """The caller; ``Unauthenticated``, or ``TooManyRequests`` once the address or the presented
        credential has used up its failure budget."""
        try:
            token = bearer_token(authorization)
            if self._sites is not None and token.startswith(SITE_CREDENTIAL_PREFIX):
                return self._sites(token)
            return self.accounts.authenticate(token)
        except Unauthenticated as exc:
            # Every failure spends both budgets, so neither hides the other's count.
            spent = [(AUTH_FAILURES, self._limiter.spend(AUTH_FAILURES, address))]
            if authorization:
                spent.append(
                    (AUTH_FAILURES_PER_CREDENTIAL, self._limiter.spend(AUTH_FAILURES_PER_CREDENTIAL, authorization))
                )
            for name, (left, retry_after_s) in spent:
                if left < 0:
                    raise too_many(name, retry_after_s) from exc
            raise


def authenticated(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    """Dependency: the authenticated caller of this request."""
    authenticator: Authenticator = request.app.state.authenticator
    caller = authenticator.principal(client_address(request), authorization)
    requester_of(request).actor = caller.actor
    return caller


def allow(*roles: str) -> Any:
    """Dependency: the caller, if its role is one of ``roles``; else 403 naming what is needed."""

    def check(caller: Annotated[Principal, Depends(authenticated)]) -> Principal:
        if caller.role not in roles:
            raise PermissionDenied(f"this needs one of the roles: {', '.join(roles)}", code="forbidden_role")
        return caller

    return Depends(check)
