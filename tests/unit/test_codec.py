"""The HE codec: exact encrypted FedAvg, keyless aggregation, and refusal of bad ciphertexts."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal.sealapi as seal

from fedhe.errors import InvalidRequest, InvalidUpdate
from fedhe.global_model import weighted_update
from fedhe.he import (
    CKKS_FORMAT_ID,
    CkksParameters,
    EvaluationContext,
    KeyMaterial,
    SecretContext,
    codec_for,
    create_key_material,
    format_for,
    load_evaluation_context,
    load_secret_context,
)
from fedhe.he._seal.context import tenseal_context

# Stated tolerance of the weighted average after decryption (DESIGN.md measured ~1e-9 per value).
FEDAVG_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def site_codec(key_material: KeyMaterial):
    return codec_for(CKKS_FORMAT_ID, load_secret_context(key_material.secret_context))


@pytest.fixture(scope="module")
def aggregator_codec(key_material: KeyMaterial):
    return codec_for(CKKS_FORMAT_ID, load_evaluation_context(key_material.evaluation_context))


def test_round_trip_recovers_values(site_codec) -> None:
    values = np.random.default_rng(1).uniform(-10, 10, 5000)
    chunks = site_codec.encrypt_update(values)
    assert len(chunks) == 2
    decrypted = site_codec.decrypt_aggregate(chunks, values.size)
    assert np.max(np.abs(decrypted - values)) < 1e-7


@pytest.mark.parametrize("num_sites", [3, 10])
def test_decrypted_aggregate_equals_plaintext_weighted_fedavg(site_codec, aggregator_codec, num_sites: int) -> None:
    rng = np.random.default_rng(num_sites)
    weight_scale = 100_000
    global_weights = rng.uniform(-1, 1, 6000)
    trained = [global_weights + rng.uniform(-10, 10, 6000) for _ in range(num_sites)]
    samples = rng.integers(1, 5000, size=num_sites)
    updates = [
        site_codec.encrypt_update(weighted_update(weights, global_weights, int(n), weight_scale))
        for weights, n in zip(trained, samples, strict=True)
    ]
    summed = site_codec.decrypt_aggregate(aggregator_codec.sum_updates(updates, 6000), 6000)
    fedavg = global_weights + summed * weight_scale / samples.sum()
    expected = np.average(np.stack(trained), axis=0, weights=samples)
    assert np.max(np.abs(fedavg - expected)) <= FEDAVG_TOLERANCE


def test_evaluation_context_has_no_secret_key(key_material: KeyMaterial, aggregator_codec) -> None:
    context = load_evaluation_context(key_material.evaluation_context)
    assert not context.has_secret_key()
    assert not context.is_private()
    assert key_material.evaluation_context != b""
    assert len(key_material.evaluation_context) < 1024
    with pytest.raises(InvalidRequest, match="no secret key"):
        aggregator_codec.encrypt_update(np.zeros(4))
    with pytest.raises(InvalidRequest, match="no secret key"):
        aggregator_codec.decrypt_aggregate([b"x"], 4)


def test_loading_a_secret_context_as_evaluation_context_is_refused(key_material: KeyMaterial) -> None:
    with pytest.raises(InvalidRequest, match="secret key"):
        load_evaluation_context(key_material.secret_context)


def test_compact_format_is_about_16_bytes_per_parameter(site_codec) -> None:
    values = np.random.default_rng(2).uniform(-1, 1, site_codec.slot_count * 2)
    size = sum(len(chunk) for chunk in site_codec.encrypt_update(values))
    assert 15.5 <= size / values.size <= 16.2


@pytest.mark.parametrize(
    ("mangle", "code"),
    [
        (lambda chunks: [b"garbage" * 100], "invalid_ciphertext"),
        (lambda chunks: [chunks[0][: len(chunks[0]) // 2]], "invalid_ciphertext"),
        (lambda chunks: chunks + chunks, "wrong_chunk_count"),
        (lambda chunks: [], "wrong_chunk_count"),
    ],
    ids=["garbage", "truncated", "too-many-chunks", "no-chunks"],
)
def test_bad_chunks_are_refused_by_name(site_codec, aggregator_codec, mangle, code: str) -> None:
    good = site_codec.encrypt_update(np.full(100, 2.5))
    bad = mangle(site_codec.encrypt_update(np.full(100, 2.5)))
    with pytest.raises(InvalidUpdate) as raised:
        aggregator_codec.sum_updates([good, bad], 100)
    assert raised.value.code == code
    if code == "invalid_ciphertext":
        assert raised.value.detail == {"chunk": 0, "update": 1}
        with pytest.raises(InvalidUpdate, match="chunk 0 is not a valid ciphertext"):
            aggregator_codec.check_chunk(0, bad[0])


def test_a_ciphertext_above_the_last_level_is_refused_naming_what_is_checked(
    key_material: KeyMaterial, aggregator_codec
) -> None:
    secret = tenseal_context(load_secret_context(key_material.secret_context))
    context = secret.seal_context().data
    ciphertext = seal.Ciphertext(context)
    seal.Encryptor(context, secret.secret_key().data).encrypt_zero_symmetric(context.first_parms_id(), ciphertext)
    with pytest.raises(InvalidUpdate, match="chunk 0 does not have this format's level, scale or size"):
        aggregator_codec.check_chunk(0, aggregator_codec.serialise(ciphertext))


def test_ciphertext_of_other_parameters_is_refused(aggregator_codec) -> None:
    # Same-parameter ciphertexts under another key are indistinguishable here; the envelope
    # key_id check (tests/integration) refuses those.

    other = create_key_material(CkksParameters(poly_modulus_degree=16384, coeff_mod_bit_sizes=[60, 40, 60]))
    foreign = codec_for(CKKS_FORMAT_ID, load_secret_context(other.secret_context)).encrypt_update(np.ones(10))
    with pytest.raises(InvalidUpdate) as raised:
        aggregator_codec.check_chunk(0, foreign[0])
    assert raised.value.code == "invalid_ciphertext"


def test_non_finite_values_are_refused(site_codec) -> None:
    with pytest.raises(InvalidRequest, match="finite"):
        site_codec.encrypt_update(np.array([1.0, np.nan]))


def test_unknown_format_is_refused(key_material: KeyMaterial) -> None:
    with pytest.raises(InvalidRequest) as raised:
        codec_for("ckks-unknown-v9", load_secret_context(key_material.secret_context))
    assert raised.value.code == "unsupported_format"


def test_insecure_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="128-bit"):
        CkksParameters(poly_modulus_degree=4096, coeff_mod_bit_sizes=[60, 40, 60])


def test_a_sum_names_the_bad_chunk_and_its_update(site_codec, aggregator_codec) -> None:
    size = site_codec.slot_count * 3
    updates = [site_codec.encrypt_update(np.full(size, value)) for value in (1.5, 2.0, 0.5)]
    bad = list(updates[2])
    bad[2] = b"\x00" * len(bad[2])
    with pytest.raises(InvalidUpdate) as raised:
        aggregator_codec.sum_updates([*updates[:2], bad], size)
    assert (raised.value.code, raised.value.detail) == ("invalid_ciphertext", {"chunk": 2, "update": 2})
    summed = site_codec.decrypt_aggregate(aggregator_codec.sum_updates(updates, size), size)
    assert np.max(np.abs(summed - 4.0)) < 1e-7


def test_parallel_encryption_matches_sequential_decryption(key_material: KeyMaterial) -> None:
    context = load_secret_context(key_material.secret_context)
    parallel = codec_for(CKKS_FORMAT_ID, context, workers=2)
    try:
        values = np.random.default_rng(5).uniform(-5, 5, parallel.slot_count * 9 + 17)
        chunks = parallel.encrypt_update(values)
        assert len(chunks) == 10
        decrypted = codec_for(CKKS_FORMAT_ID, context).decrypt_aggregate(chunks, values.size)
        assert np.max(np.abs(decrypted - values)) < 1e-7
    finally:
        parallel.close()


def test_plaintext_format_is_refused_without_the_benchmark_switch(key_material: KeyMaterial, monkeypatch) -> None:
    from fedhe.he.codec import PLAINTEXT_FORMAT_ID
    from fedhe.he.plaintext import SWITCH
    from fedhe.he.registry import supported_formats

    monkeypatch.delenv(SWITCH, raising=False)
    assert PLAINTEXT_FORMAT_ID not in supported_formats()
    with pytest.raises(InvalidRequest, match="refused outside benchmarks"):
        codec_for(PLAINTEXT_FORMAT_ID, load_secret_context(key_material.secret_context))
    monkeypatch.setenv(SWITCH, "benchmark-only")
    codec = codec_for(PLAINTEXT_FORMAT_ID, load_secret_context(key_material.secret_context))
    summed = codec.sum_updates([codec.encrypt_update(np.arange(5.0)), codec.encrypt_update(np.ones(5))], 5)
    np.testing.assert_array_equal(codec.decrypt_aggregate(summed, 5), np.arange(5.0) + 1)


def test_a_loaded_context_is_an_opaque_handle(key_material: KeyMaterial) -> None:
    """Outside fedhe.he a context is passed to codec_for and nowhere else: it names its scheme and
    keys and offers nothing of TenSEAL (no serialisation, no key, no SEAL object)."""
    secret = load_secret_context(key_material.secret_context)
    evaluation = load_evaluation_context(key_material.evaluation_context)
    assert (type(secret), type(evaluation)) == (SecretContext, EvaluationContext)
    for context in (secret, evaluation):
        assert {name for name in dir(context) if not name.startswith("_")} == {"scheme", "has_secret_key", "is_private"}
        assert not hasattr(context, "__dict__")
        assert context.scheme == "CKKS"
        assert format_for(context) == CKKS_FORMAT_ID
    assert (secret.has_secret_key(), evaluation.has_secret_key()) == (True, False)
    assert repr(secret) == "<SecretContext CKKS>"
