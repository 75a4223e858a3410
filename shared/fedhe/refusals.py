"""Refused requests in the audit log: who was refused what, from which address, and why.

Both services audit the requests they refuse in one place, the error handlers of
``fedhe.http_errors``: every 401, 403 and 429 that reaches them, and any 4xx of the routes a
service names (an upload, a key release, an endorsement). A row names the caller only as far as
the request proved it: ``account:NAME`` or ``site:ID`` once a credential or a signature
verified, otherwise ``anonymous``; the client address is always in the row, and what an
unproven request says about itself (the site a signed request names) is kept as a claim
(``claimed_site``), never as the actor.

A flood must not fill the database: each (actor, or address when anonymous; action) pair gets at
most ``per_minute`` rows a minute; the row that spends the budget says for how long further ones
go unwritten, and every refusal, written or not, is counted in ``fedhe_refusals_total``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.requests import Request

from fedhe.db import AuditingRepository, SessionFactory
from fedhe.identifiers import ACCOUNT_NAME, FEDERATION_ID, JOB_ID, KEY_ID, SITE_ID, TOKEN_ID, is_valid
from fedhe.ratelimit import Counters, Limit, RateLimiter

logger = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
AUDIT_BUDGET = "refusal-audits"
# What a refusal is audited as on routes a service does not name.
BY_STATUS = {401: "auth.refused", 403: "access.refused", 429: "request.throttled"}
# A refusal's subject echoes only path parameters of a strict pattern (identifiers, round numbers).
_IDENTIFIERS = (SITE_ID, FEDERATION_ID, KEY_ID, JOB_ID, TOKEN_ID, ACCOUNT_NAME, r"^[0-9]{1,9}$")
_STATE = "fedhe_requester"


@dataclass
class Requester:
    """Who a request has proved to be (``actor``) and what it says about itself without proof."""

    actor: str | None = None
    claims: dict[str, str] = field(default_factory=dict)


def requester_of(request: Request) -> Requester:
    """The request's ``Requester``, shared by its dependencies, route and error handlers."""
    found = getattr(request.state, _STATE, None)
    if isinstance(found, Requester):
        return found
    requester = Requester()
    setattr(request.state, _STATE, requester)
    return requester


@dataclass(frozen=True)
class Refusal:
    """One refused request, as the error handler saw it."""

    method: str
    route: str | None
    path_params: Mapping[str, Any]
    status: int
    reason: str
    client: str
    requester: Requester

    @property
    def subject(self) -> str:
        """The identifiers the request named (``<invalid>`` for one that is not an identifier), or its route."""
        named = [
            value if any(is_valid(p, value) for p in _IDENTIFIERS) else "<invalid>"
            for value in self.path_params.values()
        ]
        return "/".join(named) if named else (self.route or "<unmatched>")


class RefusalAudit:
    """Writes refused requests to a service's audit log within a per-minute budget.

    ``routes`` maps ``"METHOD /route/template"`` to the action whose every 4xx is audited;
    ``observe`` is told each refusal's action and reason (a service's own metrics).
    """

    def __init__(
        self,
        sessions: SessionFactory,
        repository: Callable[[Session], AuditingRepository],
        *,
        per_minute: int,
        counters: Counters,
        registry: CollectorRegistry,
        routes: Mapping[str, str] | None = None,
        observe: Callable[[str, str], None] | None = None,
    ) -> None:
        self._sessions = sessions
        self._repository = repository
        self._budget = RateLimiter({AUDIT_BUDGET: Limit(per_minute, 60)}, counters)
        self._routes = dict(routes or {})
        self._observe = observe
        self._counter = Counter(
            "fedhe_refusals",
            "Refused requests by audit action and error code; audited: no once the audit budget is spent.",
            ["action", "reason", "audited"],
            registry=registry,
        )

    def action(self, method: str, route: str | None, status: int) -> str | None:
        """What a refusal with ``status`` on this route is audited as; None if it is not audited."""
        named = self._routes.get(f"{method} {route}")
        if named is not None and 400 <= status < 500:
            return named
        return BY_STATUS.get(status)

    def record(self, refusal: Refusal) -> None:
        """Audit ``refusal`` unless its (actor or address, action) spent this minute's budget.

        A database that cannot take the row changes nothing about the answer: it is logged.
        """
        action = self.action(refusal.method, refusal.route, refusal.status)
        if action is None:
            return
        if self._observe is not None:
            self._observe(action, refusal.reason)
        proven = refusal.requester.actor
        left, window_s = self._budget.spend(AUDIT_BUDGET, f"{proven or refusal.client}|{action}")
        self._counter.labels(action=action, reason=refusal.reason, audited="yes" if left >= 0 else "no").inc()
        if left < 0:
            return
        detail: dict[str, Any] = {
            "granted": False,
            "reason": refusal.reason,
            "status": refusal.status,
            "client": refusal.client,
            "route": f"{refusal.method} {refusal.route or '<unmatched>'}",
        }
        if proven is None:
            detail |= refusal.requester.claims
        if left == 0:
            detail["unaudited_for_s"] = window_s
        try:
            with self._sessions.transaction() as session:
                self._repository(session).audit(
                    actor=proven or ANONYMOUS, action=action, subject=refusal.subject, detail=detail
                )
        except SQLAlchemyError as exc:
            logger.warning("refusal of %s not audited: database unavailable (%s)", action, type(exc).__name__)
