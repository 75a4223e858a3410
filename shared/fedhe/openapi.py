"""What the OpenAPI documents besides 2xx: every error status a route can answer, and binary bodies.

Every route can answer 400 (a parameter or body that does not validate), 401/403 (credential),
404, 413 (body limit), 429 (rate limit) and 503 (database or upstream); routes that change state
can also answer 409. All carry the same JSON error body.
"""

from __future__ import annotations

from typing import Any

from fedhe.schemas import ErrorBody


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("a parameter or the body is malformed or breaks a documented rule"),
    401: _error("no credential, or one that is not valid, expired or revoked"),
    403: _error("authenticated, but this caller may not do this"),
    404: _error("no such resource, or not one the caller may see"),
    413: _error("the body is over the configured limit"),
    429: _error("a rate limit was reached; retry after the Retry-After header's seconds"),
    503: _error("the database or a service this one depends on is unavailable; retry"),
}
CONFLICT: dict[int | str, dict[str, Any]] = {409: _error("valid, but it conflicts with the current state")}

_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


def binary_response(description: str) -> dict[int | str, dict[str, Any]]:
    """A 200 answer whose body is raw bytes."""
    return {200: {"content": _BINARY, "description": description}}


def binary_request(description: str) -> dict[str, Any]:
    """``openapi_extra`` for a route whose request body is raw bytes."""
    return {"requestBody": {"required": True, "description": description, "content": _BINARY}}
