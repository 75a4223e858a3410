"""A plaintext "codec" for benchmarks only: the same protocol with no encryption at all.

It exists so that a benchmark can time a federation with and without encryption side by
side. It is refused unless the process environment says ``FEDHE_INSECURE_PLAINTEXT_CODEC=
benchmark-only``, which no deployment sets: ``codec_for`` and ``supported_formats`` only see
it under that switch, so an aggregator or agent in production rejects the format id.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fedhe.errors import InvalidRequest, InvalidUpdate
from fedhe.he.codec import PLAINTEXT_FORMAT_ID, CoefficientMask, UpdateCodec

SWITCH = "FEDHE_INSECURE_PLAINTEXT_CODEC"
_VALUES_PER_CHUNK = 65_536


def plaintext_allowed() -> bool:
    """Whether this process was started for a benchmark or test that may send plaintext."""
    return os.environ.get(SWITCH) == "benchmark-only"


class PlaintextCodec(UpdateCodec):
    """Float64 chunks, summed in NumPy. Never for real data."""

    format_id = PLAINTEXT_FORMAT_ID

    def __init__(self) -> None:
        if not plaintext_allowed():
            raise InvalidRequest(f"the plaintext format is refused outside benchmarks and tests (set by {SWITCH})")

    def num_chunks(self, num_values: int) -> int:
        return math.ceil(num_values / _VALUES_PER_CHUNK)

    def encrypt_update(self, values: NDArray[Any], masks: CoefficientMask | None = None) -> list[bytes]:
        self.refuse_masks(masks)
        flat = np.asarray(values, dtype="<f8").ravel()
        return [flat[i : i + _VALUES_PER_CHUNK].tobytes() for i in range(0, flat.size, _VALUES_PER_CHUNK)]

    def decode(self, chunks: Sequence[bytes], num_values: int) -> NDArray[Any]:
        """The values in ``chunks``, checked for count and size."""
        if len(chunks) != self.num_chunks(num_values) or sum(len(c) for c in chunks) != 8 * num_values:
            raise InvalidUpdate("plaintext update has the wrong size", code="wrong_chunk_count")
        return np.frombuffer(b"".join(chunks), dtype="<f8").astype(np.float64)

    def check_chunk(self, index: int, data: bytes) -> None:
        if not data or len(data) % 8 or len(data) > 8 * _VALUES_PER_CHUNK:
            raise InvalidUpdate(f"plaintext chunk {index} has the wrong size", code="invalid_ciphertext")

    def sum_chunk(self, index: int, chunks: Iterable[bytes]) -> bytes:
        total: NDArray[Any] | None = None
        for data in chunks:
            self.check_chunk(index, data)
            values = np.frombuffer(data, dtype="<f8")
            total = values.copy() if total is None else total + values
        if total is None:
            raise InvalidRequest("no chunks to sum")
        return total.astype("<f8").tobytes()

    def decrypt_aggregate(
        self,
        chunks: Sequence[bytes],
        num_values: int,
        *,
        masks: CoefficientMask | None = None,
        summed_inputs: int | None = None,
    ) -> NDArray[Any]:
        self.refuse_masks(masks)
        return self.decode(chunks, num_values)
