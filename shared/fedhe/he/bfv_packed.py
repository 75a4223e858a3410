"""Packed BFV codec (``bfv-packed-v1``): quantised values, several per plaintext coefficient,
encrypted with seeded symmetric BFV at one data prime; under 4 bytes per value on the wire.

Site side: clip and quantise (``quantise``), pack into coefficients (``packing``), build each
plaintext from SEAL bytes, ``encrypt_symmetric`` and keep the compact form of SEAL's seeded
ciphertext (``seal_format``). Aggregator side: every chunk is loaded by SEAL (which regenerates
the seeded half and checks every word) and must sit at the data level with two components,
not in NTT form and not transparent; sums are plain ciphertext additions. Decryption reads the
summed coefficients back as centred slots, so it needs no count of summed updates. ADR 0006
derives the layout, the noise rule and the error bounds.
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as seal
from numpy.typing import NDArray

from fedhe.errors import InvalidRequest, InvalidUpdate
from fedhe.he.codec import Accumulator, UpdateCodec
from fedhe.he.context import scheme_of
from fedhe.he.packing import PackingLayout, PackingSettings, pack, packing_layout, unpack
from fedhe.he.quantise import dequantise, quantise
from fedhe.he.seal_format import compact_ciphertext, plaintext_bytes, seal_ciphertext
from fedhe.he.seal_io import SealIO

PACKED_FORMAT_ID = "bfv-packed-v1"
# Values quantised and packed at a time: whole chunks, and few enough that the float
# temporaries of a 10M-value update do not all exist at once.
_BLOCK_CHUNKS = 64


def _plain_modulus(seal_context: seal.SEALContext) -> int:
    """t, re-read through ``tenseal.sealapi`` (TenSEAL's own bindings cannot return it)."""
    parameters = SealIO.load_parameters(SealIO.save(seal_context.key_context_data().parms()))
    return int(parameters.plain_modulus().value())


class _PackedAccumulator(Accumulator):
    """Adds updates chunk by chunk, so memory holds the sum plus one chunk, never a whole update.

    A bad chunk found part-way is rolled back by subtracting the chunks already added: BFV
    addition is exact modular arithmetic, so the sum returns bit for bit.
    """

    def __init__(self, codec: PackedBfvCodec, num_values: int, initial: Sequence[bytes] | None):
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
        evaluator = self._codec.evaluator
        for index, data in enumerate(chunks):
            try:
                term = self._codec.load_chunk(index, data)
            except InvalidUpdate:
                for done in range(index):
                    evaluator.sub_inplace(self._sum[done], self._codec.load_chunk(done, chunks[done]))
                raise
            evaluator.add_inplace(self._sum[index], term)

    def iter_chunks(self) -> Iterator[bytes]:
        if self._sum is None:
            raise InvalidRequest("the running sum is empty")
        return (self._codec.serialise(ciphertext) for ciphertext in self._sum)


_WORKER: dict[str, PackedBfvCodec] = {}


def _start_worker(secret_context: bytes, settings: str) -> None:
    _WORKER["codec"] = PackedBfvCodec(ts.context_from(secret_context), PackingSettings.model_validate_json(settings))


def _encrypt_in_worker(values: NDArray[Any]) -> list[bytes]:
    return _WORKER["codec"].encrypt_update(values)


class PackedBfvCodec(UpdateCodec):
    """Quantised, packed, seeded symmetric BFV (format ``bfv-packed-v1``).

    ``settings`` are the job's (``PackingSettings``); the layout they imply is checked against
    the context here, so a codec exists only for settings that cannot overflow. With
    ``workers > 1`` large updates are encrypted by a pool of processes, as in the CKKS codec.
    ``rounding_rng`` is for tests only: it makes the stochastic rounding reproducible (and keeps
    encryption in this process); left None, every update draws fresh OS entropy.
    """

    format_id = PACKED_FORMAT_ID

    def __init__(
        self,
        context: ts.Context,
        settings: PackingSettings,
        workers: int = 1,
        *,
        rounding_rng: np.random.Generator | None = None,
    ):
        self._tenseal_context = context
        self._seal_context: seal.SEALContext = context.seal_context().data
        key_parameters = self._seal_context.key_context_data().parms()
        data_level = self._seal_context.first_context_data()
        if scheme_of(context) != "BFV" or len(data_level.parms().coeff_modulus()) != 1:
            raise InvalidRequest(
                f"format {PACKED_FORMAT_ID} needs a BFV context with one data prime", code="scheme_mismatch"
            )
        plain_modulus = _plain_modulus(self._seal_context)
        if plain_modulus & (plain_modulus - 1):
            raise InvalidRequest(f"format {PACKED_FORMAT_ID} needs a power-of-two plain modulus")
        self.settings = settings
        self.layout: PackingLayout = packing_layout(
            settings,
            poly_modulus_degree=key_parameters.poly_modulus_degree(),
            plain_modulus_bits=plain_modulus.bit_length() - 1,
            data_prime=data_level.total_coeff_modulus(),
        )
        self._data_parms_id = list(self._seal_context.first_parms_id())
        self._has_secret = context.has_secret_key()
        self._rng = rounding_rng
        self._workers = max(1, workers)
        self._pool: ProcessPoolExecutor | None = None
        self.evaluator = seal.Evaluator(self._seal_context)
        self.io = SealIO(self._seal_context)

    def num_chunks(self, num_values: int) -> int:
        if num_values <= 0:
            raise InvalidRequest("an update must have at least one value")
        return math.ceil(num_values / self.layout.values_per_chunk)

    def _secret_key(self) -> seal.SecretKey:
        if not self._has_secret:
            raise InvalidRequest("this context has no secret key: it cannot encrypt or decrypt")
        return self._tenseal_context.secret_key().data

    def encrypt_update(self, values: NDArray[Any]) -> list[bytes]:
        flat = np.asarray(values, dtype=np.float64).ravel()
        if not np.all(np.isfinite(flat)):
            raise InvalidRequest("an update must contain only finite values")
        if self._rng is None and self._workers > 1 and flat.size >= 2 * self._workers * self.layout.values_per_chunk:
            return self._encrypt_parallel(flat)
        encryptor = seal.Encryptor(self._seal_context, self._secret_key())
        rng = self._rng if self._rng is not None else np.random.default_rng()
        block = _BLOCK_CHUNKS * self.layout.values_per_chunk
        chunks: list[bytes] = []
        for start in range(0, flat.size, block):
            coefficients = pack(quantise(flat[start : start + block], self.settings, rng), self.layout)
            for row in coefficients:
                plain = self.io.load_plaintext(plaintext_bytes(row))
                chunks.append(compact_ciphertext(self.io.save(encryptor.encrypt_symmetric(plain))))
        return chunks

    def _encrypt_parallel(self, flat: NDArray[Any]) -> list[bytes]:
        if self._pool is None:
            secret = self._tenseal_context.serialize(
                save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
            )
            self._pool = ProcessPoolExecutor(
                self._workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(secret, self.settings.model_dump_json()),
            )
        per_chunk = self.layout.values_per_chunk
        step = math.ceil(math.ceil(flat.size / per_chunk) / (4 * self._workers)) * per_chunk
        slices = [flat[start : start + step] for start in range(0, flat.size, step)]
        return [chunk for part in self._pool.map(_encrypt_in_worker, slices) for chunk in part]

    def close(self) -> None:
        """Stop the encryption worker processes, if any were started."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

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
        """Deserialise chunk ``index`` and check it is a two-component ciphertext at the data level."""
        try:
            ciphertext = self.io.load(seal_ciphertext(data))
        except (RuntimeError, ValueError) as exc:
            raise InvalidUpdate(
                f"chunk {index} is not a valid ciphertext for this context",
                code="invalid_ciphertext",
                detail={"chunk": index},
            ) from exc
        if (
            ciphertext.size() != 2
            or list(ciphertext.parms_id()) != self._data_parms_id
            or ciphertext.is_ntt_form()
            or ciphertext.is_transparent()
        ):
            raise InvalidUpdate(
                f"chunk {index} does not have this format's level or size",
                code="invalid_ciphertext",
                detail={"chunk": index},
            )
        return ciphertext

    def check_chunk(self, index: int, data: bytes) -> None:
        """Raise ``InvalidUpdate`` unless ``data`` is a valid chunk (chunk-level intake)."""
        self.load_chunk(index, data)

    def sum_chunk(self, index: int, chunks: Iterable[bytes]) -> bytes:
        """The sum of the ``index``-th chunks of several updates (or partial sums), read one at a
        time, so a round can be summed chunk index by chunk index in the memory of one chunk.

        Every chunk is checked; the first bad one raises ``InvalidUpdate`` (detail: ``chunk``
        and ``update``, its position) and nothing is returned. The caller must not sum more
        than ``settings.max_sites`` site updates into one aggregate.
        """
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

    def serialise(self, ciphertext: seal.Ciphertext) -> bytes:
        """The wire form of a (summed) ciphertext."""
        return compact_ciphertext(self.io.save(ciphertext))

    def parse(self, chunks: Sequence[bytes], expected_chunks: int) -> list[seal.Ciphertext]:
        """Deserialise and check every chunk; raise ``InvalidUpdate`` on the first bad one."""
        self.check_count(chunks, expected_chunks)
        return [self.load_chunk(index, data) for index, data in enumerate(chunks)]

    def accumulator(self, num_values: int, initial: Sequence[bytes] | None = None) -> Accumulator:
        return _PackedAccumulator(self, num_values, initial)

    def decrypt_aggregate(self, chunks: Sequence[bytes], num_values: int) -> NDArray[Any]:
        """The sum of the dequantised updates in ``chunks`` (a sum of any number up to
        ``max_sites``; no count needed)."""
        decryptor = seal.Decryptor(self._seal_context, self._secret_key())
        self.check_count(chunks, self.num_chunks(num_values))
        n = self.layout.poly_modulus_degree
        coefficients = np.zeros((len(chunks), n), dtype=np.uint64)
        plain = seal.Plaintext()
        for index, data in enumerate(chunks):
            decryptor.decrypt(self.load_chunk(index, data), plain)
            # The bindings expose no bulk read of a plaintext: one call per coefficient.
            count = plain.coeff_count()
            coefficients[index, :count] = np.fromiter(map(plain.__getitem__, range(count)), np.uint64, count)
        return dequantise(unpack(coefficients, self.layout, num_values), self.settings)

    def noise_budget(self, chunk: bytes) -> int:
        """SEAL's remaining invariant noise budget (bits) of a chunk (needs the secret key)."""
        decryptor = seal.Decryptor(self._seal_context, self._secret_key())
        return int(decryptor.invariant_noise_budget(self.load_chunk(0, chunk)))
