"""What every SEAL-backed codec shares: chunk checks, sums by chunk index, parallel encryption.

A concrete codec says how to encrypt a block of values (``_encrypt_block``), how to read a
chunk's wire form (``_deserialise``) and what form its ciphertexts must have (``_has_format``),
how to serialise a ciphertext (``serialise``) and how many values a chunk holds; this base
does the rest the same way for all of them.
"""

from __future__ import annotations

import abc
import math
import multiprocessing
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import tenseal.sealapi as seal
from numpy.typing import NDArray

from fedhe.errors import InvalidRequest, InvalidUpdate
from fedhe.he._seal.context import EvaluationContext, SecretContext, load, serialise, tenseal_context
from fedhe.he._seal.format import FormatMismatch
from fedhe.he.codec import CoefficientMask, UpdateCodec

_WORKER: dict[str, SealCodec] = {}


def _start_worker(codec_class: type[SealCodec], secret_context: bytes, options: str | None) -> None:
    _WORKER["codec"] = codec_class._in_worker(SecretContext(load(secret_context)), options)


def _encrypt_in_worker(values: NDArray[Any], masks: CoefficientMask | None, first_chunk: int) -> list[bytes]:
    return _WORKER["codec"]._encrypt_block(values, masks, first_chunk)


class SealCodec(UpdateCodec):
    """A codec whose chunks are SEAL ciphertexts of one context.

    With ``workers > 1`` large updates are encrypted by a pool of processes (TenSEAL holds the
    GIL, so threads would not help); each worker gets the secret context once, through a pipe,
    at start, and keeps it in memory only.
    """

    evaluator: seal.Evaluator
    # What ``_has_format`` checks, as the error naming a chunk that fails it says.
    _format_checks: str

    def __init__(self, context: SecretContext | EvaluationContext, workers: int, options: str | None = None):
        self._tenseal_context = tenseal_context(context)
        self._seal_context: seal.SEALContext = self._tenseal_context.seal_context().data
        self._has_secret = context.has_secret_key()
        self._workers = max(1, workers)
        self._worker_options = options
        self._pool: ProcessPoolExecutor | None = None
        self.evaluator = seal.Evaluator(self._seal_context)

    @classmethod
    @abc.abstractmethod
    def _in_worker(cls, context: SecretContext, options: str | None) -> SealCodec:
        """The codec an encryption worker process builds from the secret context and ``options``."""

    @property
    @abc.abstractmethod
    def values_per_chunk(self) -> int:
        """How many values one chunk (one ciphertext) holds."""

    @abc.abstractmethod
    def _encrypt_block(self, flat: NDArray[np.float64], masks: CoefficientMask | None, first_chunk: int) -> list[bytes]:
        """Encrypt finite values in this process: chunks ``first_chunk`` onwards of an update."""

    @abc.abstractmethod
    def _deserialise(self, data: bytes) -> seal.Ciphertext:
        """The ciphertext of a chunk's wire form; ``RuntimeError`` or ``ValueError`` if it is not one."""

    @abc.abstractmethod
    def _has_format(self, ciphertext: seal.Ciphertext) -> bool:
        """Whether a loaded ciphertext has the level, size and form this format sends."""

    @abc.abstractmethod
    def serialise(self, ciphertext: seal.Ciphertext) -> bytes:
        """The wire form of a (summed) ciphertext."""

    def load_chunk(self, index: int, data: bytes) -> seal.Ciphertext:
        """Deserialise chunk ``index`` and check it is a ciphertext of this format; ``InvalidUpdate`` if not."""
        try:
            ciphertext = self._deserialise(data)
        except (RuntimeError, ValueError) as exc:
            raise self._refusal(index, exc) from exc
        if not self._has_format(ciphertext):
            raise self._refusal(index, FormatMismatch())
        return ciphertext

    def _refusal(self, index: int, exc: Exception) -> InvalidUpdate:
        """The error naming chunk ``index``: not a ciphertext at all, or not of this format."""
        if isinstance(exc, FormatMismatch):
            message = f"chunk {index} does not have this format's {self._format_checks}"
        else:
            message = f"chunk {index} is not a valid ciphertext for this context"
        return InvalidUpdate(message, code="invalid_ciphertext", detail={"chunk": index})

    def _parallel_allowed(self) -> bool:
        """Whether this codec may hand encryption to worker processes."""
        return True

    def num_chunks(self, num_values: int) -> int:
        if num_values <= 0:
            raise InvalidRequest("an update must have at least one value")
        return math.ceil(num_values / self.values_per_chunk)

    def _secret_key(self) -> seal.SecretKey:
        if not self._has_secret:
            raise InvalidRequest("this context has no secret key: it cannot encrypt or decrypt")
        return self._tenseal_context.secret_key().data

    def encrypt_update(self, values: NDArray[Any], masks: CoefficientMask | None = None) -> list[bytes]:
        self.refuse_masks(masks)
        flat = np.asarray(values, dtype=np.float64).ravel()
        if not np.all(np.isfinite(flat)):
            raise InvalidRequest("an update must contain only finite values")
        if self._parallel_allowed() and self._workers > 1 and flat.size >= 2 * self._workers * self.values_per_chunk:
            return self._encrypt_parallel(flat, masks)
        return self._encrypt_block(flat, masks, 0)

    def _encrypt_parallel(self, flat: NDArray[Any], masks: CoefficientMask | None) -> list[bytes]:
        if self._pool is None:
            secret = serialise(self._tenseal_context, secret_key=True)
            self._pool = ProcessPoolExecutor(
                self._workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(type(self), secret, self._worker_options),
            )
        per_chunk = self.values_per_chunk
        step = math.ceil(math.ceil(flat.size / per_chunk) / (4 * self._workers)) * per_chunk
        starts = range(0, flat.size, step)
        parts = self._pool.map(
            _encrypt_in_worker,
            [flat[start : start + step] for start in starts],
            [masks] * len(starts),
            [start // per_chunk for start in starts],
        )
        return [chunk for part in parts for chunk in part]

    def close(self) -> None:
        """Stop the encryption worker processes, if any were started."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def parse(self, chunks: Sequence[bytes], expected_chunks: int) -> list[seal.Ciphertext]:
        """Deserialise and check every chunk; raise ``InvalidUpdate`` on the first bad one."""
        self.check_count(chunks, expected_chunks)
        return [self.load_chunk(index, data) for index, data in enumerate(chunks)]

    def check_chunk(self, index: int, data: bytes) -> None:
        self.load_chunk(index, data)

    def sum_chunk(self, index: int, chunks: Iterable[bytes]) -> bytes:
        total: seal.Ciphertext | None = None
        for position, data in enumerate(chunks):
            try:
                term = self.load_chunk(index, data)
            except InvalidUpdate as exc:
                exc.detail["update"] = position
                raise
            if total is None:
                total = term
            else:
                self.evaluator.add_inplace(total, term)
        if total is None:
            raise InvalidRequest("no chunks to sum")
        return self.serialise(total)
