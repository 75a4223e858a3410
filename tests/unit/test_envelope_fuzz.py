"""Fuzzing what the aggregator parses from an upload: every input is accepted or refused with a 4xx.

Deterministic (fixed seeds) so a failure reproduces: random byte strings, valid envelopes
mutated by bit flips, truncation, insertion and splicing, hostile JSON headers (deep nesting,
huge integers, wrong types), and mutated ciphertext chunks fed to the real codecs' chunk check
and sum.
The only exception allowed out of the parser is ``InvalidUpdate``; anything else (a 500 at the
service) fails the test with the input that caused it.
"""

from __future__ import annotations

import json
import random
import struct
from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from fedhe.errors import InvalidUpdate
from fedhe.he import (
    CKKS_FORMAT_ID,
    Envelope,
    KeyMaterial,
    UpdateCodec,
    codec_for,
    decode_envelope,
    encode_envelope,
    load_evaluation_context,
    load_secret_context,
)
from fedhe.he.envelope import MAGIC
from fedhe.schemas import check_metrics

RANDOM_CASES = 5000
MUTATED_CASES = 10000
HOSTILE_HEADERS = 400
CHUNK_CASES = 1000


def _valid(rng: random.Random) -> bytes:
    chunks = [rng.randbytes(rng.randint(1, 64)) for _ in range(rng.randint(1, 4))]
    return encode_envelope(
        Envelope(
            format_id=CKKS_FORMAT_ID,
            key_id="key-" + "a" * 32,
            num_values=rng.randint(1, 10_000),
            chunks=chunks,
            meta={"num_samples": rng.randint(1, 100), "metrics": {"loss": rng.random()}},
        )
    )


def _mutate(data: bytes, rng: random.Random) -> bytes:
    raw = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0 and raw:
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        raw = raw[: rng.randrange(len(raw) + 1)]
    elif kind == 2:
        at = rng.randrange(len(raw) + 1)
        raw[at:at] = rng.randbytes(rng.randint(1, 32))
    elif kind == 3 and raw:
        at = rng.randrange(len(raw))
        raw[at : at + rng.randint(1, 16)] = b""
    else:
        other = _valid(rng)
        raw = raw[: rng.randrange(len(raw) + 1)] + other[rng.randrange(len(other) + 1) :]
    return bytes(raw)


def _hostile_headers(rng: random.Random) -> Iterator[bytes]:
    depth_bombs = ["[" * n + "]" * n for n in (100, 5_000, 60_000)] + ['{"a":' * 20_000 + "1" + "}" * 20_000]
    for text in depth_bombs:
        yield text.encode()
    yield b'{"format_id":"f","key_id":"k","num_values":' + b"9" * 5000 + b',"chunk_sizes":[1]}'
    yield b'{"format_id":"f","key_id":"k","num_values":1,"chunk_sizes":[' + b"9" * 5000 + b"]}"
    values: list[object] = [None, True, False, -1, 0, 2**70, 1.5, float("inf"), "x", [], {}, [True], [-3], [0]]
    for _ in range(HOSTILE_HEADERS):
        header = {
            "format_id": rng.choice([*values, CKKS_FORMAT_ID]),
            "key_id": rng.choice([*values, "key-" + "a" * 32]),
            "num_values": rng.choice([*values, 4]),
            "chunk_sizes": rng.choice([*values, [1, 2], [10**12]]),
            "num_samples": rng.choice(values),
            "metrics": rng.choice([*values, {"m": 10**400}, {"m": float("nan")}, {"x" * 100: 1}]),
        }
        yield json.dumps(header, allow_nan=True).encode()


def _framed(header: bytes, body: bytes = b"") -> bytes:
    return MAGIC + struct.pack(">I", len(header)) + header + body


def _parse_like_the_aggregator(data: bytes) -> str:
    """What intake does before it touches a ciphertext; returns the outcome for the tally."""
    try:
        envelope = decode_envelope(data)
        check_metrics(envelope.meta.get("metrics", {}))
    except InvalidUpdate as exc:
        return exc.code
    except ValueError:
        return "invalid_metrics"
    return "parsed"


def _run(cases: Iterator[bytes], parse: Callable[[bytes], str]) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    for data in cases:
        try:
            outcomes[parse(data)] += 1
        except Exception as exc:  # any other exception is the failure this test hunts for
            pytest.fail(f"{type(exc).__name__}: {exc!s:.200} on input {data[:120]!r}")
    return outcomes


def test_random_bytes_are_refused_by_name() -> None:
    rng = random.Random(1)
    cases = (rng.randbytes(rng.randint(0, 512)) for _ in range(RANDOM_CASES // 2))
    prefixed = (MAGIC + rng.randbytes(rng.randint(0, 512)) for _ in range(RANDOM_CASES // 2))
    outcomes = _run(iter([*cases, *prefixed]), _parse_like_the_aggregator)
    assert sum(outcomes.values()) == RANDOM_CASES
    assert outcomes["parsed"] == 0


def test_mutated_envelopes_parse_or_are_refused_by_name() -> None:
    rng = random.Random(2)
    outcomes = _run((_mutate(_valid(rng), rng) for _ in range(MUTATED_CASES)), _parse_like_the_aggregator)
    assert sum(outcomes.values()) == MUTATED_CASES
    assert outcomes["truncated_update"] > 0
    assert outcomes["invalid_envelope"] > 0


def test_hostile_headers_are_refused_by_name() -> None:
    rng = random.Random(3)
    outcomes = _run((_framed(h, b"\x01" * 16) for h in _hostile_headers(rng)), _parse_like_the_aggregator)
    assert sum(outcomes.values()) == HOSTILE_HEADERS + 6
    assert set(outcomes) <= {"parsed", "invalid_envelope", "truncated_update", "invalid_metrics"}


def _checked_and_summed(aggregator: UpdateCodec, good: bytes) -> Callable[[bytes], str]:
    """Feed a chunk to the intake's check and to the sum at close: both must refuse it by name, or
    both take it (a flipped coefficient bit is still a ciphertext; only its value changes)."""

    def outcome(chunk: bytes) -> str:
        try:
            aggregator.check_chunk(0, chunk)
        except InvalidUpdate as exc:
            with pytest.raises(InvalidUpdate) as summed:
                aggregator.sum_chunk(0, [good, chunk])
            assert summed.value.detail == {"chunk": 0, "update": 1}
            return exc.code
        aggregator.sum_chunk(0, [good, chunk])
        return "summed"

    return outcome


def test_mutated_ciphertext_chunks_are_refused_by_the_check_and_the_sum_alike(key_material: KeyMaterial) -> None:
    site = codec_for(CKKS_FORMAT_ID, load_secret_context(key_material.secret_context))
    aggregator = codec_for(CKKS_FORMAT_ID, load_evaluation_context(key_material.evaluation_context))
    good = site.encrypt_update(np.linspace(-1, 1, 10))
    rng = random.Random(4)

    outcomes = _run((_mutate(good[0], rng) for _ in range(CHUNK_CASES)), _checked_and_summed(aggregator, good[0]))
    assert sum(outcomes.values()) == CHUNK_CASES
    assert outcomes["invalid_ciphertext"] > CHUNK_CASES // 2


def test_a_compressed_serialisation_is_refused_before_seal_parses_it(key_material: KeyMaterial) -> None:
    import zstandard

    from fedhe.he._seal.io import COMPR_ZSTD
    from fedhe.he._seal.io import SEAL_HEADER as HEADER

    site = codec_for(CKKS_FORMAT_ID, load_secret_context(key_material.secret_context))
    aggregator = codec_for(CKKS_FORMAT_ID, load_evaluation_context(key_material.evaluation_context))
    chunk = site.encrypt_update(np.ones(4))[0]
    magic, size, major, minor, _, _, _ = HEADER.unpack_from(chunk)
    payload = zstandard.ZstdCompressor().compress(chunk[HEADER.size :])
    compressed = HEADER.pack(magic, size, major, minor, COMPR_ZSTD, 0, HEADER.size + len(payload)) + payload
    with pytest.raises(InvalidUpdate) as refused:
        aggregator.check_chunk(0, compressed)
    assert refused.value.code == "invalid_ciphertext"


def test_mutated_packed_chunks_never_escape_the_aggregator() -> None:
    from fedhe.he import PACKED_FORMAT_ID, BfvParameters, PackedBfvCodec, PackingSettings, create_key_material

    settings = PackingSettings(clip_range=0.5, bits=16, max_sites=128)
    material = create_key_material(BfvParameters())
    site = PackedBfvCodec(load_secret_context(material.secret_context), settings)
    aggregator = codec_for(PACKED_FORMAT_ID, load_evaluation_context(material.evaluation_context), options=settings)
    assert isinstance(aggregator, PackedBfvCodec)
    good = site.encrypt_update(np.linspace(-0.5, 0.5, 100))
    rng = random.Random(6)

    outcomes = _run((_mutate(good[0], rng) for _ in range(CHUNK_CASES)), _checked_and_summed(aggregator, good[0]))
    assert sum(outcomes.values()) == CHUNK_CASES
    assert outcomes["invalid_ciphertext"] > CHUNK_CASES // 2
