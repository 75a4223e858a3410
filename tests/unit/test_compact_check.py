"""Chunks of the packed codec checked in their compact form with numpy (``CompactLayout``), as
the intake checks them, against SEAL itself (``SealCodec.check_chunk``: the chunk loaded by
SEAL, its seed expanded): the numpy check never accepts what SEAL would refuse, and refuses
what SEAL accepts only in bytes SEAL does not read.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from numpy.typing import NDArray

from fedhe.errors import InvalidUpdate
from fedhe.he import (
    PACKED_FORMAT_ID,
    BfvParameters,
    KeyMaterial,
    PackedBfvCodec,
    PackingSettings,
    codec_for,
    create_key_material,
    load_evaluation_context,
    load_secret_context,
)
from fedhe.he._seal.codec import SealCodec
from fedhe.he._seal.format import COMPACT_MAGIC, CompactLayout, _pack_words

SETTINGS = PackingSettings(clip_range=0.5, bits=16, max_sites=128)
CHUNK = 2 * 8192
WORDS_AT = 4 + 73 + 8  # magic, SEAL's members, the word count
MUTATIONS = 400


@pytest.fixture(scope="module")
def material() -> KeyMaterial:
    return create_key_material(BfvParameters())


@pytest.fixture(scope="module")
def site(material: KeyMaterial) -> PackedBfvCodec:
    return PackedBfvCodec(load_secret_context(material.secret_context), SETTINGS)


@pytest.fixture(scope="module")
def aggregator(material: KeyMaterial) -> PackedBfvCodec:
    codec = codec_for(PACKED_FORMAT_ID, load_evaluation_context(material.evaluation_context), options=SETTINGS)
    assert isinstance(codec, PackedBfvCodec)
    return codec


def _with_c0(layout: CompactLayout, chunk: bytes, words: NDArray[np.uint64]) -> bytes:
    """``chunk`` (seeded, compact) with its first half's words replaced."""
    packed = _pack_words(words.astype(np.uint64))
    return chunk[:WORDS_AT] + packed + chunk[WORDS_AT + len(packed) :]


def test_the_compact_layout_is_the_one_seal_writes(site: PackedBfvCodec, aggregator: PackedBfvCodec) -> None:
    chunks = site.encrypt_update(np.full(3 * CHUNK, 0.25))
    layout = aggregator._compact
    assert chunks[0][4 : 4 + 73] == layout.members
    assert all(layout.check(chunk) for chunk in chunks)
    summed = aggregator.sum_chunk(0, [chunks[0], chunks[1]])  # not seeded: both halves
    assert layout.check(summed)
    assert not layout.check(site.io.save(site.load_chunk(0, chunks[0])))  # SEAL's own form: SEAL reads it


def test_a_word_at_q_is_refused_and_one_below_is_accepted_as_by_seal(
    site: PackedBfvCodec, aggregator: PackedBfvCodec
) -> None:
    layout = aggregator._compact
    chunk = site.encrypt_update(np.zeros(10))[0]
    words = np.zeros(8192, dtype=np.uint64)
    words[4321] = layout.prime - 1
    aggregator.check_chunk(0, _with_c0(layout, chunk, words))
    SealCodec.check_chunk(aggregator, 0, _with_c0(layout, chunk, words))
    words[4321] = layout.prime
    for check in (aggregator.check_chunk, lambda i, c: SealCodec.check_chunk(aggregator, i, c)):
        with pytest.raises(InvalidUpdate, match="chunk 0 is not a valid ciphertext"):
            check(0, _with_c0(layout, chunk, words))


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        (WORDS_AT - 8, 1, "level or size"),  # word count 8193
        (4 + 32, 1, "level or size"),  # is_ntt_form
        (4 + 33, 3, "level or size"),  # three components
        (-81 + 6, 2, "not a valid ciphertext"),  # the seed record claims zstd compression
        (-81 + 16, 0, "not a valid ciphertext"),  # prng_type unknown
        (-81 + 16, 3, "not a valid ciphertext"),  # no such prng_type
    ],
    ids=["word-count", "ntt-form", "size-3", "record-zstd", "prng-unknown", "prng-3"],
)
def test_a_chunk_not_exactly_in_the_form_sites_send_is_refused_without_seal(
    site: PackedBfvCodec, aggregator: PackedBfvCodec, where: int, value: int, message: str
) -> None:
    raw = bytearray(site.encrypt_update(np.zeros(10))[0])
    raw[where] = value
    with pytest.raises(InvalidUpdate, match=f"chunk 3 (does not have this format's|is) {message}") as refused:
        aggregator.check_chunk(3, bytes(raw))
    assert refused.value.detail == {"chunk": 3}


def test_what_the_numpy_check_accepts_seal_loads(site: PackedBfvCodec, aggregator: PackedBfvCodec) -> None:
    """Random mutations of a valid chunk: every one the compact check accepts, SEAL loads (and
    sums); every one SEAL refuses, the compact check refuses."""
    rng = random.Random(18)
    good = site.encrypt_update(np.linspace(-0.5, 0.5, 100))[0]
    other = site.encrypt_update(np.zeros(100))[0]
    accepted = refused = 0
    for _ in range(MUTATIONS):
        raw = bytearray(good)
        kind = rng.randrange(4)
        if kind == 0:  # flipped bits anywhere
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        elif kind == 1:  # a word near q in a random place
            words = np.zeros(8192, dtype=np.uint64)
            words[rng.randrange(8192)] = aggregator._compact.prime + rng.randint(-2, 2)
            raw = bytearray(_with_c0(aggregator._compact, good, words))
        elif kind == 2:  # another chunk's seed
            raw[-64:] = other[-64:]
        else:  # truncated or extended
            raw = raw[: rng.randrange(len(raw))] if rng.random() < 0.5 else raw + rng.randbytes(rng.randint(1, 20))
        mutated = bytes(raw)
        assert mutated.startswith(COMPACT_MAGIC) or kind == 0
        try:
            aggregator.check_chunk(0, mutated)
        except InvalidUpdate:
            refused += 1
            try:
                SealCodec.check_chunk(aggregator, 0, mutated)
            except InvalidUpdate:
                continue
            # SEAL loads it: only bytes SEAL does not read may differ (a header it ignores)
            header_bytes = set(range(len(good) - 81, len(good) - 81 + 16))
            assert len(mutated) == len(good)
            assert {i for i in range(len(good)) if mutated[i] != good[i]} <= header_bytes
            continue
        accepted += 1
        SealCodec.check_chunk(aggregator, 0, mutated)
        aggregator.sum_chunk(0, [mutated, other])
    assert accepted > MUTATIONS // 10
    assert refused > MUTATIONS // 4
