"""The update-codec interface and its registry of versioned format ids.

A codec turns a flat float64 vector into ciphertext chunks (site side), sums chunks without a
secret key (aggregator side) and turns a summed aggregate back into floats (site side). The
format id names the codec *and* its wire layout: a change to either is a new id, so sites and
aggregators can refuse what they do not understand instead of misreading it.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence, Sized
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import tenseal as ts
from numpy.typing import NDArray

from fedhe.errors import InvalidRequest, InvalidUpdate

if TYPE_CHECKING:
    from fedhe.he.packing import PackingSettings


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

_FORMAT_OF_SCHEME = {"BFV": DEFAULT_FORMAT_ID, "CKKS": CKKS_FORMAT_ID}


def supported_formats() -> list[str]:
    """Format ids this process accepts (the plaintext one only under its benchmark switch)."""
    from fedhe.he.plaintext import PLAINTEXT_FORMAT_ID, plaintext_allowed

    encrypted = [DEFAULT_FORMAT_ID, CKKS_FORMAT_ID]
    return [*encrypted, PLAINTEXT_FORMAT_ID] if plaintext_allowed() else encrypted


def format_for(context: ts.Context) -> str:
    """The update format a federation's context takes when a job does not name one."""
    from fedhe.he.context import scheme_of

    return _FORMAT_OF_SCHEME[scheme_of(context)]


def codec_for(
    format_id: str, context: ts.Context, workers: int = 1, options: PackingSettings | None = None
) -> UpdateCodec:
    """The codec for ``format_id`` bound to ``context``; ``workers`` processes encrypt large updates.

    ``options`` are the job's packing settings, required by ``bfv-packed-v1`` (sites and the
    aggregator must pass the same ones: they fix how many values a chunk holds).
    """
    from fedhe.he.bfv_packed import PackedBfvCodec
    from fedhe.he.ckks_seeded import SeededCkksCodec
    from fedhe.he.context import scheme_of
    from fedhe.he.plaintext import PLAINTEXT_FORMAT_ID, PlaintextCodec

    if format_id == PLAINTEXT_FORMAT_ID:
        return PlaintextCodec()
    expected = {fmt: scheme for scheme, fmt in _FORMAT_OF_SCHEME.items()}.get(format_id)
    if expected is None:
        raise InvalidRequest(
            f"unknown update format {format_id!r}",
            code="unsupported_format",
            detail={"supported": supported_formats()},
        )
    if scheme_of(context) != expected:
        raise InvalidRequest(f"format {format_id!r} needs a {expected} context", code="scheme_mismatch")
    if format_id == PACKED_FORMAT_ID:
        if options is None:
            raise InvalidRequest(
                f"format {format_id!r} needs the job's packing settings", code="missing_packing_settings"
            )
        return PackedBfvCodec(context, options, workers)
    return SeededCkksCodec(context, workers)
