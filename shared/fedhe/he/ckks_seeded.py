"""Compact CKKS codec: symmetric, seeded ciphertexts encoded at the last level.

Every site holds the secret context, so updates can be encrypted symmetrically. SEAL then
serialises a *seeded* ciphertext: the uniformly random half is replaced by the PRNG seed that
regenerates it, which halves the bytes. Encoding at the last level of the modulus chain drops
the primes a sum never uses. Together about 16 bytes per parameter on the wire (float32: 4,
TenSEAL's usual [60,40,40] public-key setting: ~81). A summed ciphertext is no longer seeded
(32 bytes per slot); that is what the aggregator stores and publishes.

Ciphertexts cross the wire uncompressed and are checked before SEAL parses them
(``fedhe.he.seal_io``): SEAL's zstd loader aborts the process on some hostile inputs.
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as seal
from numpy.typing import NDArray

from fedhe.errors import InvalidRequest, InvalidUpdate
from fedhe.he.codec import DEFAULT_FORMAT_ID, Accumulator, UpdateCodec
from fedhe.he.seal_io import SealIO


class _SeededAccumulator(Accumulator):
    """Adds updates chunk by chunk, so memory holds the sum plus one chunk, never a whole update.

    A bad chunk found part-way is rolled back by subtracting the chunks already added: CKKS
    addition is exact modular arithmetic on the coefficients, so the sum returns bit for bit.
    """

    def __init__(self, codec: SeededCkksCodec, num_values: int, initial: Sequence[bytes] | None):
        self._codec = codec
        self._num_chunks = codec.num_chunks(num_values)
        self._sum: list[seal.Ciphertext] | None = None
        if initial is not None:
            self._sum = codec.parse(initial, self._num_chunks)

    def add(self, chunks: Sequence[bytes]) -> None:
        self._codec.check_count(chunks, self._num_chunks)
        if self._sum is None:
            self._sum = self._codec.parse(chunks, self._num_chunks)
            return
        for index, data in enumerate(chunks):
            try:
                term = self._codec.load_chunk(index, data)
            except InvalidUpdate:
                for done in range(index):
                    self._codec.evaluator.sub_inplace(self._sum[done], self._codec.load_chunk(done, chunks[done]))
                raise
            self._codec.evaluator.add_inplace(self._sum[index], term)

    def iter_chunks(self) -> Iterator[bytes]:
        if self._sum is None:
            raise InvalidRequest("the running sum is empty")
        return (self._codec.io.save(ct) for ct in self._sum)


_WORKER: dict[str, SeededCkksCodec] = {}


def _start_worker(secret_context: bytes) -> None:
    _WORKER["codec"] = SeededCkksCodec(ts.context_from(secret_context))


def _encrypt_in_worker(values: NDArray[Any]) -> list[bytes]:
    return _WORKER["codec"].encrypt_update(values)


class SeededCkksCodec(UpdateCodec):
    """Seeded symmetric CKKS at the last level (format ``ckks-seeded-last-v2``).

    With ``workers > 1``, large updates are encrypted by a pool of processes (TenSEAL holds
    the GIL, so threads would not help); each worker gets the secret context once, through a
    pipe, at start.
    """

    format_id = DEFAULT_FORMAT_ID

    def __init__(self, context: ts.Context, workers: int = 1):
        self._workers = max(1, workers)
        self._pool: ProcessPoolExecutor | None = None
        self._tenseal_context = context
        self._seal_context: seal.SEALContext = context.seal_context().data
        self._scale = float(context.global_scale)
        self._last_parms_id = self._seal_context.last_parms_id()
        self._encoder = seal.CKKSEncoder(self._seal_context)
        self.slot_count: int = self._encoder.slot_count()
        self.evaluator = seal.Evaluator(self._seal_context)
        self.io = SealIO(self._seal_context)
        self._has_secret = context.has_secret_key()

    def num_chunks(self, num_values: int) -> int:
        if num_values <= 0:
            raise InvalidRequest("an update must have at least one value")
        return math.ceil(num_values / self.slot_count)

    def _secret_key(self) -> seal.SecretKey:
        if not self._has_secret:
            raise InvalidRequest("this context has no secret key: it cannot encrypt or decrypt")
        return self._tenseal_context.secret_key().data

    def encrypt_update(self, values: NDArray[Any]) -> list[bytes]:
        flat = np.asarray(values, dtype=np.float64).ravel()
        if not np.all(np.isfinite(flat)):
            raise InvalidRequest("an update must contain only finite values")
        if self._workers > 1 and flat.size >= 2 * self._workers * self.slot_count:
            return self._encrypt_parallel(flat)
        encryptor = seal.Encryptor(self._seal_context, self._secret_key())
        chunks: list[bytes] = []
        plain = seal.Plaintext()
        for start in range(0, flat.size, self.slot_count):
            self._encoder.encode(
                flat[start : start + self.slot_count].tolist(), self._last_parms_id, self._scale, plain
            )
            chunks.append(self.io.save(encryptor.encrypt_symmetric(plain)))
        return chunks

    @staticmethod
    def check_count(chunks: Sequence[bytes], expected_chunks: int) -> None:
        """Raise ``InvalidUpdate`` unless there are exactly ``expected_chunks`` chunks."""
        if len(chunks) != expected_chunks:
            raise InvalidUpdate(
                f"expected {expected_chunks} ciphertext chunks, got {len(chunks)}",
                code="wrong_chunk_count",
                detail={"expected": expected_chunks, "received": len(chunks)},
            )

    def load_chunk(self, index: int, data: bytes) -> seal.Ciphertext:
        """Deserialise one chunk and check it has this format's level, scale and size."""
        try:
            ciphertext = self.io.load(data)
        except (RuntimeError, ValueError) as exc:
            raise InvalidUpdate(
                f"chunk {index} is not a valid ciphertext for this context",
                code="invalid_ciphertext",
                detail={"chunk": index},
            ) from exc
        if (
            ciphertext.size() != 2
            or list(ciphertext.parms_id()) != list(self._last_parms_id)
            or not math.isclose(ciphertext.scale, self._scale, rel_tol=1e-9)
            or not ciphertext.is_ntt_form()
        ):
            raise InvalidUpdate(
                f"chunk {index} does not have this format's level, scale or size",
                code="invalid_ciphertext",
                detail={"chunk": index},
            )
        return ciphertext

    def _encrypt_parallel(self, flat: NDArray[Any]) -> list[bytes]:
        if self._pool is None:
            secret = self._tenseal_context.serialize(
                save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
            )
            self._pool = ProcessPoolExecutor(
                self._workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(secret,),
            )
        chunks_per_slice = math.ceil(math.ceil(flat.size / self.slot_count) / (4 * self._workers))
        step = chunks_per_slice * self.slot_count
        slices = [flat[start : start + step] for start in range(0, flat.size, step)]
        return [chunk for part in self._pool.map(_encrypt_in_worker, slices) for chunk in part]

    def close(self) -> None:
        """Stop the encryption worker processes, if any were started."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def parse(self, chunks: Sequence[bytes], expected_chunks: int) -> list[seal.Ciphertext]:
        """Deserialise and check every chunk; raise ``InvalidUpdate`` on the first bad one."""
        self.check_count(chunks, expected_chunks)
        return [self.load_chunk(index, data) for index, data in enumerate(chunks)]

    def accumulator(self, num_values: int, initial: Sequence[bytes] | None = None) -> Accumulator:
        return _SeededAccumulator(self, num_values, initial)

    def decrypt_aggregate(self, chunks: Sequence[bytes], num_values: int) -> NDArray[Any]:
        decryptor = seal.Decryptor(self._seal_context, self._secret_key())
        parsed = self.parse(chunks, self.num_chunks(num_values))
        out = np.empty(len(parsed) * self.slot_count, dtype=np.float64)
        plain = seal.Plaintext()
        for index, ciphertext in enumerate(parsed):
            decryptor.decrypt(ciphertext, plain)
            out[index * self.slot_count : (index + 1) * self.slot_count] = self._encoder.decode_double(plain)
        return out[:num_values]
