"""The one exception hierarchy of fedhe, shared by every service and client.

::

    FedheError
    ├── InvalidRequest          400  the request is malformed or breaks a rule
    │   ├── InvalidUpdate       400  an encrypted update cannot be accepted as sent
    │   ├── DataProblem         400  a site's data file cannot be used (names file, row, column)
    │   └── AggregateRefused    400  a site will not apply an aggregate its transcript does not prove
    │       └── ImplausibleAggregate  400  a decrypted sum honest inputs cannot produce (a forged input)
    ├── Unauthenticated         401  no credential, or one that is not valid
    ├── PermissionDenied        403  authenticated, but not allowed (pending/revoked site)
    ├── NotFound                404  no such site, federation, job or round
    ├── Conflict                409  valid, but not now (duplicate, round closed, stale key)
    ├── PayloadTooLarge         413  the body is over the configured limit
    ├── BudgetExhausted         409  a site's privacy budget forbids further training
    ├── TooManyRequests         429  a rate limit was reached; retry after ``retry_after_s``
    └── UpstreamUnavailable     503  a service this one depends on did not answer

Each error carries a stable machine-readable ``code`` and a human ``message``; services map
the hierarchy to HTTP once (``fedhe.http_errors``) and clients map it back
(``fedhe.api_client``), so the same class is raised on both sides of the wire.
"""

from __future__ import annotations

from typing import Any


class FedheError(Exception):
    """Base class of every error fedhe raises on purpose."""

    status_code: int = 500
    default_code: str = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, detail: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.detail = detail or {}

    def to_body(self) -> dict[str, Any]:
        """The JSON error body sent over HTTP."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail:
            body["detail"] = self.detail
        return {"error": body}


class InvalidRequest(FedheError):
    """The request is malformed or breaks a documented rule."""

    status_code = 400
    default_code = "invalid_request"


class InvalidUpdate(InvalidRequest):
    """An encrypted update cannot be accepted as sent (bad envelope, ciphertext or shape)."""

    default_code = "invalid_update"


class DataProblem(InvalidRequest):
    """A site's data cannot be used as the job needs it; the message names the file and place."""

    default_code = "data_problem"


class AggregateRefused(InvalidRequest):
    """A site will not apply a published aggregate: its transcript does not prove an honest sum."""

    default_code = "aggregate_refused"


class ImplausibleAggregate(AggregateRefused):
    """A decrypted aggregate that the round's honest inputs cannot produce (a forged input)."""

    default_code = "implausible_aggregate"


class Unauthenticated(FedheError):
    """No credential was presented, or the one presented is not valid."""

    status_code = 401
    default_code = "unauthenticated"


class PermissionDenied(FedheError):
    """The caller is known but not allowed to do this."""

    status_code = 403
    default_code = "permission_denied"


class NotFound(FedheError):
    """The named resource does not exist."""

    status_code = 404
    default_code = "not_found"


class Conflict(FedheError):
    """The request is valid but conflicts with the current state."""

    status_code = 409
    default_code = "conflict"


class PayloadTooLarge(FedheError):
    """The request body is larger than the configured limit."""

    status_code = 413
    default_code = "payload_too_large"


class BudgetExhausted(FedheError):
    """Training another round would exceed the site's privacy budget."""

    status_code = 409
    default_code = "privacy_budget_exhausted"


class TooManyRequests(FedheError):
    """A rate limit was reached for this credential, client address or action."""

    status_code = 429
    default_code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int, code: str | None = None):
        super().__init__(message, code=code, detail={"retry_after_s": retry_after_s})
        self.retry_after_s = retry_after_s


class UpstreamUnavailable(FedheError):
    """A service this one depends on could not be reached or answered with an error."""

    status_code = 503
    default_code = "upstream_unavailable"


_BY_STATUS: dict[int, type[FedheError]] = {
    400: InvalidRequest,
    401: Unauthenticated,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    429: TooManyRequests,
    503: UpstreamUnavailable,
}


def error_from_body(status_code: int, body: Any) -> FedheError:
    """Rebuild the exception a service raised from its HTTP status and JSON error body."""
    message = f"HTTP {status_code}"
    code: str | None = None
    detail: dict[str, Any] | None = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        message = str(err.get("message", message))
        code = str(err["code"]) if "code" in err else None
        detail = err.get("detail") if isinstance(err.get("detail"), dict) else None
    # Any server-side failure is, from the caller's side, a service that did not answer properly:
    # clients retry it with backoff rather than give up.
    if status_code == 429:
        retry = (detail or {}).get("retry_after_s")
        return TooManyRequests(message, retry_after_s=retry if isinstance(retry, int) else 1, code=code)
    cls = _BY_STATUS.get(status_code, UpstreamUnavailable if status_code >= 500 else FedheError)
    if code == InvalidUpdate.default_code:
        cls = InvalidUpdate
    elif code == BudgetExhausted.default_code:
        cls = BudgetExhausted
    return cls(message, code=code, detail=detail)
