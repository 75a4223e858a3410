"""The codecs the HE benchmark compares, behind one small interface.

``SeededCodec`` (``ckks-seeded-last-v2``) and ``PackedCodec`` (``bfv-packed-v1``) are fedhe's
product codecs (``fedhe.he``). ``TenSEALBaseline`` is the common TenSEAL set-up (CKKS, n=8192,
[60, 40, 40], scale 2^40, public-key encryption, one ``CKKSVector`` per 4096 values) kept here,
outside the product, only to be measured against. ``PlainFloat32`` is plaintext FedAvg, the floor.

Each codec names the weight scale S its sites divide by: 100,000 (a public bound on a round's
samples, ADR 0003) for the CKKS rows, and for the packed codec the largest n_k the benchmark
draws, with R the largest |w| (ADR 0006's rule: S bounds each n_k, R bounds each value).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import tenseal as ts
from numpy.typing import NDArray

from fedhe.he import (
    CKKS_FORMAT_ID,
    PACKED_FORMAT_ID,
    BfvParameters,
    CkksParameters,
    PackingSettings,
    UpdateCodec,
    codec_for,
    create_key_material,
)
from fedhe.he import load_evaluation_context as load_eval
from fedhe.he import load_secret_context as load_secret

WEIGHT_SCALE = 100_000
MAX_SAMPLES = 5000  # the benchmark draws n_k in [100, 5000)
MAX_WEIGHT = 10.0  # and weights in [-10, 10]
# 15 bits leave 8 bits of headroom in a 23-bit slot: enough for the 200-site rows.
PACKED_SETTINGS = PackingSettings(clip_range=MAX_WEIGHT, bits=15, max_sites=200)


class BenchCodec(Protocol):
    name: str
    weight_scale: int

    def encrypt(self, values: NDArray[Any]) -> list[bytes]: ...

    def aggregator_context(self) -> bytes: ...

    def aggregator_settings(self) -> str: ...

    def decrypt(self, chunks: Sequence[bytes], num_values: int) -> NDArray[Any]: ...


class SeededCodec:
    """fedhe's default codec, optionally encrypting with several processes."""

    weight_scale = WEIGHT_SCALE

    def __init__(self, workers: int = 1):
        material = create_key_material(CkksParameters())
        self.name = f"fedhe {CKKS_FORMAT_ID} ({workers} proc)"
        self._eval = material.evaluation_context
        self._codec = codec_for(CKKS_FORMAT_ID, load_secret(material.secret_context), workers=workers)

    def encrypt(self, values: NDArray[Any]) -> list[bytes]:
        return self._codec.encrypt_update(values)

    def aggregator_context(self) -> bytes:
        return self._eval

    def aggregator_settings(self) -> str:
        return ""

    def decrypt(self, chunks: Sequence[bytes], num_values: int) -> NDArray[Any]:
        return self._codec.decrypt_aggregate(chunks, num_values)

    def close(self) -> None:
        self._codec.close()


class PackedCodec:
    """fedhe's packed BFV codec, optionally encrypting with several processes."""

    weight_scale = MAX_SAMPLES

    def __init__(self, workers: int = 1, settings: PackingSettings = PACKED_SETTINGS):
        material = create_key_material(BfvParameters())
        self.name = f"fedhe {PACKED_FORMAT_ID} ({workers} proc)"
        self.settings = settings
        self._eval = material.evaluation_context
        self._codec = codec_for(
            PACKED_FORMAT_ID, load_secret(material.secret_context), workers=workers, options=settings
        )

    def encrypt(self, values: NDArray[Any]) -> list[bytes]:
        return self._codec.encrypt_update(values)

    def aggregator_context(self) -> bytes:
        return self._eval

    def aggregator_settings(self) -> str:
        return self.settings.model_dump_json()

    def decrypt(self, chunks: Sequence[bytes], num_values: int) -> NDArray[Any]:
        return self._codec.decrypt_aggregate(chunks, num_values)

    def close(self) -> None:
        self._codec.close()


class TenSEALBaseline:
    """The usual TenSEAL configuration: public-key CKKS, [60, 40, 40], one vector per 4096 values."""

    name = "TenSEAL common [60,40,40] public-key"
    slots = 4096
    weight_scale = WEIGHT_SCALE

    def __init__(self) -> None:
        self._context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40])
        self._context.global_scale = 2.0**40
        public = self._context.copy()
        public.make_context_public()
        self._public = public.serialize()

    def encrypt(self, values: NDArray[Any]) -> list[bytes]:
        flat = np.asarray(values, dtype=np.float64).ravel()
        return [
            ts.ckks_vector(self._context, flat[i : i + self.slots].tolist()).serialize()
            for i in range(0, flat.size, self.slots)
        ]

    def aggregator_context(self) -> bytes:
        return self._public

    def aggregator_settings(self) -> str:
        return ""

    def decrypt(self, chunks: Sequence[bytes], num_values: int) -> NDArray[Any]:
        parts = [ts.ckks_vector_from(self._context, chunk).decrypt() for chunk in chunks]
        return np.concatenate([np.asarray(p) for p in parts])[:num_values]


class PlainFloat32:
    """Plaintext FedAvg on float32: what federated learning without encryption sends."""

    name = "plaintext float32"
    weight_scale = WEIGHT_SCALE

    def encrypt(self, values: NDArray[Any]) -> list[bytes]:
        return [np.asarray(values, dtype=np.float32).tobytes()]

    def aggregator_context(self) -> bytes:
        return b""

    def aggregator_settings(self) -> str:
        return ""

    def decrypt(self, chunks: Sequence[bytes], num_values: int) -> NDArray[Any]:
        return np.frombuffer(chunks[0], dtype=np.float64)[:num_values]


class Summer(Protocol):
    def add(self, chunks: Sequence[bytes]) -> None: ...

    def result(self) -> Iterable[bytes]: ...


class _TenSEALSummer:
    def __init__(self, context: bytes, num_values: int):
        self._context = ts.context_from(context)
        self._sum: list[Any] | None = None

    def add(self, chunks: Sequence[bytes]) -> None:
        if self._sum is None:
            self._sum = [ts.ckks_vector_from(self._context, c) for c in chunks]
            return
        for index in range(len(chunks)):
            self._sum[index].add_(ts.ckks_vector_from(self._context, chunks[index]))

    def result(self) -> list[bytes]:
        assert self._sum is not None
        return [v.serialize() for v in self._sum]


class _PlainSummer:
    def __init__(self, context: bytes, num_values: int):
        self._sum = np.zeros(num_values, dtype=np.float64)

    def add(self, chunks: Sequence[bytes]) -> None:
        self._sum += np.frombuffer(chunks[0], dtype=np.float32)

    def result(self) -> list[bytes]:
        return [self._sum.tobytes()]


FEDHE_KINDS = ("seeded", "packed")
"""The codecs whose aggregator sums a round as the service does, chunk index by chunk index."""


def fedhe_aggregator(kind: str, context: bytes, settings: str) -> UpdateCodec:
    """The aggregator side of a fedhe codec: keyless context and, for ``packed``, the job's settings."""
    if kind == "packed":
        return codec_for(PACKED_FORMAT_ID, load_eval(context), options=PackingSettings.model_validate_json(settings))
    return codec_for(CKKS_FORMAT_ID, load_eval(context))


def summer_for(kind: str, context: bytes, num_values: int) -> Summer:
    """The aggregator side of a baseline (``tenseal`` or ``plain``), which sums update by update."""
    return {"tenseal": _TenSEALSummer, "plain": _PlainSummer}[kind](context, num_values)
