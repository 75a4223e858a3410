"""Given round-0 weights: stored once by an admin, named by their sha256, read by members.

A job that starts from a pre-trained model names the flat float64 little-endian vector of its
weights (``client_agent.models.flat_weights``' layout) by sha256. The vector is public to members, as
seeded round-0 weights always were; what the aggregator adds is one place to fetch it from.
It checks what it can without TensorFlow (the hash, whole float64 values, all finite) and, at
job creation, that the vector is stored and has the model's parameter count; every site checks
the hash again before using it.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import numpy as np

from aggregator.repository import AggregatorRepository
from aggregator.tables import InitialWeightsRow
from fedhe.db import SessionFactory
from fedhe.errors import InvalidRequest, NotFound, PayloadTooLarge
from fedhe.schemas import InitialWeightsPublic

VALUE_BYTES = 8


async def read_limited(body: AsyncIterator[bytes], limit: int) -> bytes:
    """The whole streamed body, refused as soon as it runs past ``limit`` bytes."""
    data = bytearray()
    async for part in body:
        data += part
        if len(data) > limit:
            raise PayloadTooLarge(f"initial weights over the {limit}-byte limit", detail={"limit": limit})
    return bytes(data)


def _public(row: InitialWeightsRow) -> InitialWeightsPublic:
    return InitialWeightsPublic(
        sha256=row.sha256, num_values=row.num_values, created_by=row.created_by, created_at=row.created_at
    )


class InitialWeightsStore:
    """Stores and serves given round-0 weight vectors."""

    def __init__(self, sessions: SessionFactory):
        self._sessions = sessions

    def put(self, sha256: str, data: bytes, *, actor: str) -> tuple[InitialWeightsPublic, bool]:
        """Store ``data`` under ``sha256`` (checked); returns it and whether it was new."""
        if not data or len(data) % VALUE_BYTES:
            raise InvalidRequest(
                f"initial weights are float64 values, 8 bytes each; {len(data)} bytes is not a whole number of them "
                "(a truncated file?)",
                code="initial_weights_mismatch",
            )
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise InvalidRequest(
                f"the body's sha256 is {actual}, not the {sha256} in the path (a truncated or different file?)",
                code="initial_weights_mismatch",
            )
        values = np.frombuffer(data, dtype="<f8")
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise InvalidRequest(
                f"initial weights hold {bad.size} NaN or infinite values (the first at index {bad[0]})",
                code="initial_weights_mismatch",
            )
        with self._sessions.transaction() as session:
            repo = AggregatorRepository(session)
            existing = repo.initial_weights(sha256)
            if existing is not None:
                return _public(existing), False
            row = InitialWeightsRow(sha256=sha256, num_values=values.size, data=data, created_by=actor)
            repo.add(row)
            repo.flush()
            repo.audit(actor=actor, action="initial_weights.store", subject=sha256, detail={"num_values": values.size})
            return _public(row), True

    def get(self, sha256: str) -> bytes:
        """The stored vector's bytes."""
        with self._sessions.transaction() as session:
            row = AggregatorRepository(session).initial_weights(sha256)
            if row is None:
                raise NotFound(f"no initial weights {sha256}", code="initial_weights_not_found")
            return bytes(row.data)


def require_initial_weights(repo: AggregatorRepository, sha256: str, num_parameters: int) -> None:
    """Refuse a job whose given round-0 weights are not stored, or do not fit its model."""
    row = repo.initial_weights(sha256)
    if row is None:
        raise InvalidRequest(
            f"model.initial_weights_sha256 {sha256} is not stored here: upload the weights first "
            "(fedhe job create --initial-weights FILE does both)",
            code="initial_weights_not_found",
        )
    if row.num_values != num_parameters:
        raise InvalidRequest(
            f"the stored initial weights hold {row.num_values} values, the job's model {num_parameters}",
            code="initial_weights_mismatch",
        )
