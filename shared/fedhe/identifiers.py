"""Identifiers: how fedhe makes them and the strict patterns every peer's identifier must match.

An identifier from the network is checked against its pattern before it is used anywhere: in
a URL, a file name, a database query or a log line. The patterns admit only lower-case
letters, digits and single hyphens, so no identifier can carry a path separator, a dot, a
percent sign, whitespace or a control character.
"""

from __future__ import annotations

import re
import secrets
from typing import Annotated

from fastapi import Path
from pydantic import StringConstraints

from fedhe.errors import InvalidRequest

SITE_ID = r"^site-[0-9a-f]{16}$"
FEDERATION_ID = r"^fed-[0-9a-f]{16}$"
KEY_ID = r"^key-[0-9a-f]{32}$"
JOB_ID = r"^job-[0-9a-f]{16}$"
TOKEN_ID = r"^tok-[0-9a-f]{16}$"  # noqa: S105 (a pattern for token ids, not a secret)
ACCOUNT_NAME = r"^[a-z][a-z0-9-]{0,62}$"
NONCE = r"^[0-9a-f]{32,64}$"
SHA256 = r"^[0-9a-f]{64}$"

_RANDOM_HEX = {"site": 16, "fed": 16, "key": 32, "job": 16, "tok": 16, "upl": 24}

SiteId = Annotated[str, StringConstraints(pattern=SITE_ID)]
FederationId = Annotated[str, StringConstraints(pattern=FEDERATION_ID)]
KeyId = Annotated[str, StringConstraints(pattern=KEY_ID)]
JobId = Annotated[str, StringConstraints(pattern=JOB_ID)]
TokenId = Annotated[str, StringConstraints(pattern=TOKEN_ID)]
AccountName = Annotated[str, StringConstraints(pattern=ACCOUNT_NAME)]
Nonce = Annotated[str, StringConstraints(pattern=NONCE)]

# The same patterns for path parameters: a malformed id is a 400 naming the parameter.
SiteIdPath = Annotated[str, Path(pattern=SITE_ID, description="a site id, site-<16 hex>")]
FederationIdPath = Annotated[str, Path(pattern=FEDERATION_ID, description="a federation id, fed-<16 hex>")]
KeyIdPath = Annotated[str, Path(pattern=KEY_ID, description="a key id, key-<32 hex>")]
JobIdPath = Annotated[str, Path(pattern=JOB_ID, description="a job id, job-<16 hex>")]
TokenIdPath = Annotated[str, Path(pattern=TOKEN_ID, description="a token id, tok-<16 hex>")]
AccountNamePath = Annotated[str, Path(pattern=ACCOUNT_NAME, description="an account name")]
Sha256Path = Annotated[str, Path(pattern=SHA256, description="a sha256 digest, 64 lower-case hex digits")]
RoundNumberPath = Annotated[int, Path(ge=0, le=100_000, description="a round number")]


def new_id(kind: str) -> str:
    """A fresh identifier of ``kind`` (``site``, ``fed``, ``key``, ``job`` or ``tok``)."""
    return f"{kind}-{secrets.token_hex(_RANDOM_HEX[kind] // 2)}"


def is_valid(pattern: str, value: object) -> bool:
    """Whether ``value`` is a string matching ``pattern``."""
    return isinstance(value, str) and re.fullmatch(pattern, value) is not None


def checked(pattern: str, value: object, what: str) -> str:
    """``value`` if it matches ``pattern``, else ``InvalidRequest`` (the value is not echoed)."""
    if not is_valid(pattern, value):
        raise InvalidRequest(f"{what} is not a valid identifier", code="invalid_identifier", detail={"field": what})
    assert isinstance(value, str)
    return value


def loggable(pattern: str, value: object) -> str:
    """``value`` for a log line or an audit actor if it matches ``pattern``, else a placeholder."""
    return value if is_valid(pattern, value) and isinstance(value, str) else "<invalid>"
