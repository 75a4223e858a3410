"""Single use of signed requests: a nonce is accepted once within its freshness window.

With Redis the claim is one ``SET NX EX``, shared by every keyserver replica; without Redis the
nonce is a primary key in the keyserver's database. If the store cannot be reached the request
is refused (503): accepting it would make replay possible.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Protocol

import redis
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError

from fedhe.db import SessionFactory, utcnow
from fedhe.errors import UpstreamUnavailable
from keyserver.tables import UsedNonceRow


class NonceStore(Protocol):
    """Remembers which nonces were used."""

    def claim(self, nonce: str, ttl_s: int) -> bool:
        """True the first time ``nonce`` is claimed within ``ttl_s``; False for a replay."""
        ...


class RedisNonces:
    """Nonces as expiring Redis keys."""

    def __init__(self, url: str, prefix: str):
        self._redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._prefix = prefix

    def claim(self, nonce: str, ttl_s: int) -> bool:
        try:
            return bool(self._redis.set(f"{self._prefix}:nonce:{nonce}", b"1", nx=True, ex=ttl_s))
        except redis.RedisError as exc:
            raise UpstreamUnavailable(
                "cannot check the request's nonce; retry", code="nonce_store_unavailable"
            ) from exc


class DatabaseNonces:
    """Nonces as rows of ``used_nonces``; expired rows are removed as new ones arrive."""

    def __init__(self, sessions: SessionFactory):
        self._sessions = sessions

    def claim(self, nonce: str, ttl_s: int) -> bool:
        now = utcnow()
        try:
            with self._sessions.transaction() as session:
                session.execute(delete(UsedNonceRow).where(UsedNonceRow.expires_at < now))
                session.add(UsedNonceRow(nonce=nonce, expires_at=now + timedelta(seconds=ttl_s)))
        except IntegrityError:
            return False
        return True


def nonce_store_for(redis_url: str | None, prefix: str, sessions: SessionFactory) -> NonceStore:
    """Redis (keys under ``prefix``) when configured, the database otherwise."""
    return RedisNonces(redis_url, prefix) if redis_url else DatabaseNonces(sessions)
