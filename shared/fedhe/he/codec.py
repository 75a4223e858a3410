"""The update-codec interface and the versioned format ids (``fedhe.he.registry`` maps an id
to its codec).

A codec turns a flat float64 vector into ciphertext chunks (site side), sums chunks without a
secret key (aggregator side) and turns a summed aggregate back into floats (site side). The
format id names the codec *and* its wire layout: a change to either is a new id, so sites and
aggregators can refuse what they do not understand instead of misreading it.

Codecs raise the errors of ``fedhe.errors``: ``InvalidUpdate`` for a chunk or update that is not
one of this format (as it streams in, or when summed), ``InvalidRequest`` for a request the
codec cannot serve (no secret key, masks it cannot carry, an unknown format id), and
``ImplausibleAggregate`` for a decrypted sum its inputs cannot have produced.

This module imports nothing else of ``fedhe.he`` (and no TenSEAL): every other module may
import it.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence, Sized
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from fedhe.errors import InvalidRequest, InvalidUpdate


class CoefficientMask(Protocol):
    """Values added to plaintext coefficients modulo the plain modulus before encryption (or after
    decryption): secure aggregation's masks (``fedhe.secagg.masks``)."""

    def block(self, start_chunk: int, count: int, degree: int, modulus_bits: int) -> NDArray[np.uint64]:
        """The mask of ``count`` chunks from ``start_chunk``: one row of ``degree`` coefficients each."""
        ...


class UpdateCodec(abc.ABC):
    """Encrypts, sums and decrypts model updates for one HE context."""

    format_id: str
    supports_masks = False
    """Whether updates can carry secure aggregation's masks (exact modular plaintexts only)."""

    @abc.abstractmethod
    def num_chunks(self, num_values: int) -> int:
        """How many chunks an update of ``num_values`` values has."""

    @abc.abstractmethod
    def encrypt_update(self, values: NDArray[Any], masks: CoefficientMask | None = None) -> list[bytes]:
        """Encrypt a flat vector (needs the secret context), its plaintext first masked by ``masks``."""

    @abc.abstractmethod
    def check_chunk(self, index: int, data: bytes) -> None:
        """Raise ``InvalidUpdate`` unless ``data`` is a valid ``index``-th chunk (checked as it streams in)."""

    @abc.abstractmethod
    def sum_chunk(self, index: int, chunks: Iterable[bytes]) -> bytes:
        """The sum of the ``index``-th chunks of several updates, read one at a time.

        A round is summed chunk index by chunk index, in the memory of one chunk. The first bad
        chunk raises ``InvalidUpdate`` (detail: ``chunk`` and ``update``, its position).
        """

    def sum_updates(self, updates: Sequence[Sequence[bytes]], num_values: int) -> list[bytes]:
        """The sum of whole updates held in memory, chunk index by chunk index as a round is summed.

        For tests and benchmarks: the service sums stored chunks with ``sum_chunk`` instead.
        """
        expected = self.num_chunks(num_values)
        for update in updates:
            self.check_count(update, expected)
        return [self.sum_chunk(index, (update[index] for update in updates)) for index in range(expected)]

    @staticmethod
    def check_count(chunks: Sized, expected_chunks: int) -> None:
        """Raise ``InvalidUpdate`` unless there are exactly ``expected_chunks`` chunks (or chunk sizes)."""
        if len(chunks) != expected_chunks:
            raise InvalidUpdate(
                f"expected {expected_chunks} ciphertext chunks, got {len(chunks)}",
                code="wrong_chunk_count",
                detail={"expected": expected_chunks, "received": len(chunks)},
            )

    def close(self) -> None:  # noqa: B027 (optional hook; most codecs hold nothing to release)
        """Release worker processes or other resources the codec holds."""

    @abc.abstractmethod
    def decrypt_aggregate(
        self,
        chunks: Sequence[bytes],
        num_values: int,
        *,
        masks: CoefficientMask | None = None,
        summed_inputs: int | None = None,
    ) -> NDArray[Any]:
        """Decrypt a (summed) vector of ``num_values`` values (needs the secret context).

        ``masks`` are added to the decrypted plaintext first (to remove the self masks);
        with ``summed_inputs`` = k, a sum that k inputs within the codec's range cannot produce
        raises ``ImplausibleAggregate`` (codecs without a range check nothing).
        """

    def refuse_masks(self, masks: CoefficientMask | None) -> None:
        """``InvalidRequest`` if masks are asked of a codec that cannot carry them."""
        if masks is not None and not self.supports_masks:
            raise InvalidRequest(
                f"format {self.format_id} cannot carry secure aggregation's masks (it needs {PACKED_FORMAT_ID})",
                code="masking_unsupported",
            )


CKKS_FORMAT_ID = "ckks-seeded-last-v2"
PACKED_FORMAT_ID = "bfv-packed-v1"
DEFAULT_FORMAT_ID = PACKED_FORMAT_ID
"""The packed BFV codec: under 4 bytes per value (ADR 0006); ``ckks-seeded-last-v2`` stays available."""
PLAINTEXT_FORMAT_ID = "plain-f64-insecure-v1"
"""No encryption at all, for benchmarks only (``fedhe.he.plaintext``): refused without its switch."""
