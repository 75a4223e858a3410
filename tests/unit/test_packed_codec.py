"""The packed BFV codec (bfv-packed-v1) with real TenSEAL: exact sums, the error bounds of
ADR 0006 at their extremes, overflow refusal, and refusal of bad ciphertexts.

Tests that assert values pass a seeded ``rounding_rng`` (the codec's test-only parameter) so
every draw, and so every asserted error, is reproducible.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as seal

from fedhe.errors import InvalidRequest, InvalidUpdate
from fedhe.he import (
    CKKS_FORMAT_ID,
    PACKED_FORMAT_ID,
    BfvParameters,
    CkksParameters,
    KeyMaterial,
    PackedBfvCodec,
    PackingSettings,
    check_packing,
    codec_for,
    create_key_material,
    load_evaluation_context,
    load_secret_context,
    parameters_from,
    quantisation_report,
)
from fedhe.he._seal.context import tenseal_context
from fedhe.he._seal.format import plaintext_bytes, plaintext_coefficients
from fedhe.he._seal.io import SealIO
from fedhe.he.packing import bytes_per_value, pack, unpack, upload_bytes
from fedhe.he.quantise import quantise

R = 0.5
SETTINGS = PackingSettings(clip_range=R, bits=16, max_sites=128)
CHUNK = 2 * 8192  # values per ciphertext with the default layout


@pytest.fixture(scope="module")
def bfv_material() -> KeyMaterial:
    return create_key_material(BfvParameters())


@pytest.fixture(scope="module")
def site(bfv_material: KeyMaterial) -> PackedBfvCodec:
    return PackedBfvCodec(
        load_secret_context(bfv_material.secret_context), SETTINGS, rounding_rng=np.random.default_rng(7)
    )


@pytest.fixture(scope="module")
def aggregator(bfv_material: KeyMaterial) -> PackedBfvCodec:
    codec = codec_for(PACKED_FORMAT_ID, load_evaluation_context(bfv_material.evaluation_context), options=SETTINGS)
    assert isinstance(codec, PackedBfvCodec)
    return codec


def test_default_layout_packs_two_23_bit_slots_per_coefficient() -> None:
    layout = check_packing(SETTINGS)
    assert (layout.values_per_coefficient, layout.slot_bits, layout.levels) == (2, 23, 32767)
    assert layout.values_per_chunk == CHUNK
    # 128 sums of ±32767 fill the signed 23-bit slot exactly: 128 * 32767 = 2^22 - 128.
    assert layout.max_sites * layout.levels <= 2**22 - 1


def test_round_trip_is_within_one_step_and_exact_on_the_grid(site: PackedBfvCodec) -> None:
    values = np.random.default_rng(1).uniform(-R, R, CHUNK + 1000)
    values[:5] = [R, -R, 0.0, 3 * SETTINGS.step, -1234 * SETTINGS.step]
    chunks = site.encrypt_update(values)
    assert len(chunks) == 2
    decrypted = site.decrypt_aggregate(chunks, values.size)
    np.testing.assert_array_equal(decrypted[:5], values[:5])
    assert np.max(np.abs(decrypted - values)) < SETTINGS.step


def test_an_update_is_under_4_bytes_per_value_and_a_sum_under_8(
    site: PackedBfvCodec, aggregator: PackedBfvCodec
) -> None:
    values = np.random.default_rng(2).uniform(-R, R, 4 * CHUNK)
    chunks = site.encrypt_update(values)
    assert 3.75 < sum(map(len, chunks)) / values.size < 3.77
    summed = aggregator.sum_chunk(0, [chunks[0], chunks[0]])
    assert 7.5 < len(summed) / CHUNK < 7.51


@pytest.mark.parametrize(
    ("bits", "max_sites", "per_value"), [(16, 128, 3.76), (20, 8, 3.76), (24, 128, 7.52), (40, 64, 7.52)]
)
def test_planned_bytes_per_value_match_a_real_encryption(
    bfv_material: KeyMaterial, bits: int, max_sites: int, per_value: float
) -> None:
    settings = PackingSettings(clip_range=R, bits=bits, max_sites=max_sites)
    codec = codec_for(PACKED_FORMAT_ID, load_secret_context(bfv_material.secret_context), options=settings)
    size = 3 * CHUNK + 5
    chunks = codec.encrypt_update(np.random.default_rng(bits).uniform(-R, R, size))
    assert upload_bytes(settings, size) == sum(map(len, chunks))
    assert bytes_per_value(settings) == len(chunks[0]) / check_packing(settings).values_per_chunk
    assert bytes_per_value(settings) == pytest.approx(per_value, abs=0.01)


def test_planned_bytes_follow_the_ring_dimension() -> None:
    parameters = BfvParameters(poly_modulus_degree=4096, coeff_mod_bit_sizes=[54, 54], plain_modulus_bits=40)
    material = create_key_material(parameters)
    settings = PackingSettings(clip_range=R, bits=16, max_sites=16)
    codec = codec_for(PACKED_FORMAT_ID, load_secret_context(material.secret_context), options=settings)
    chunks = codec.encrypt_update(np.zeros(100))
    assert upload_bytes(settings, 100, parameters) == len(chunks[0])


def test_weighted_mean_of_100_sites_is_within_1e_5_r(site: PackedBfvCodec, aggregator: PackedBfvCodec) -> None:
    """Issue 10's target, with ADR 0006's rule: S bounds each n_k, R bounds each change."""
    rng = np.random.default_rng(100)
    size, sites, weight_scale = 20_000, 100, 1000
    changes = rng.uniform(-R, R, (sites, size))
    samples = rng.integers(500, weight_scale + 1, sites)
    updates = [site.encrypt_update(change * n / weight_scale) for change, n in zip(changes, samples, strict=True)]
    total = samples.sum()
    mean = site.decrypt_aggregate(aggregator.sum_updates(updates, size), size) * weight_scale / total
    error = np.max(np.abs(mean - np.average(changes, axis=0, weights=samples)))
    # ADR 0006: with probability >= 1 - delta over all values (Hoeffding and a union bound),
    # |error| <= (S/N) * step * sqrt(K ln(2P/delta) / 2); the deterministic bound is (S/N) * K * step.
    hoeffding = weight_scale / total * SETTINGS.step * math.sqrt(sites * math.log(2 * size / 1e-9) / 2)
    assert error <= 1e-5 * R
    assert error <= hoeffding <= weight_scale / total * sites * SETTINGS.step


def test_one_site_at_and_beyond_the_range(site: PackedBfvCodec) -> None:
    values = np.array([R, -R, 2 * R, -3 * R, 1e9, R * (1 + 1e-12), 0.25])
    assert quantisation_report(values, SETTINGS) == {"clipped_fraction": 4 / 7}
    decrypted = site.decrypt_aggregate(site.encrypt_update(values), values.size)
    np.testing.assert_array_equal(decrypted[:6], [R, -R, R, -R, R, R])
    assert abs(decrypted[6] - 0.25) < SETTINGS.step


def test_max_sites_at_plus_and_minus_r_sum_exactly_with_noise_to_spare(
    site: PackedBfvCodec, aggregator: PackedBfvCodec
) -> None:
    """The headroom extreme: every slot of every coefficient at ±128 * L, borrows across slots."""
    pattern = np.where(np.random.default_rng(3).random(CHUNK) < 0.5, R, -R)
    chunks = [site.encrypt_update(pattern)[0] for _ in range(SETTINGS.max_sites)]
    summed = aggregator.sum_chunk(0, chunks)
    np.testing.assert_array_equal(site.decrypt_aggregate([summed], CHUNK), SETTINGS.max_sites * pattern)
    assert site.noise_budget(summed) >= 3
    # The same ciphertext added max_sites times: its noise grows linearly, the deterministic worst case.
    coherent = aggregator.sum_chunk(0, [chunks[0]] * SETTINGS.max_sites)
    np.testing.assert_array_equal(site.decrypt_aggregate([coherent], CHUNK), SETTINGS.max_sites * pattern)
    assert site.noise_budget(coherent) >= 1


def test_max_sites_random_updates_stay_within_the_deterministic_bound(
    site: PackedBfvCodec, aggregator: PackedBfvCodec
) -> None:
    rng = np.random.default_rng(4)
    updates = rng.uniform(-R, R, (SETTINGS.max_sites, 3000))
    summed = aggregator.sum_updates([site.encrypt_update(update) for update in updates], 3000)
    error = site.decrypt_aggregate(summed, 3000) - updates.sum(axis=0)
    assert np.max(np.abs(error)) < SETTINGS.max_sites * SETTINGS.step
    # Mean-zero: the average error over 3000 sums is far inside its 5-sigma band.
    assert abs(error.mean()) < 5 * math.sqrt(SETTINGS.max_sites / 4 / 3000) * SETTINGS.step


def test_stochastic_rounding_is_unbiased() -> None:
    draws = 200_000
    values = np.array([0.1, 0.5, 0.77, -0.3, -0.999]) * SETTINGS.step + 0.123
    levels = quantise(np.repeat(values, draws), SETTINGS, np.random.default_rng(5)).reshape(values.size, draws)
    bias = levels.mean(axis=1) * SETTINGS.step - values
    # Each draw errs by less than one step with variance <= step^2 / 4, so the mean of 200,000
    # draws has standard deviation <= step / 894; 5 sigma is the tolerance.
    assert np.max(np.abs(bias)) < 5 * SETTINGS.step / (2 * math.sqrt(draws))


def test_rounding_draws_fresh_entropy_without_a_test_generator() -> None:
    halfway = np.full(10_000, 0.5 * SETTINGS.step)
    assert not np.array_equal(quantise(halfway, SETTINGS), quantise(halfway, SETTINGS))


@pytest.mark.parametrize(
    ("bits", "max_sites", "per_coefficient"),
    [(16, 128, 2), (15, 200, 2), (16, 129, 1), (8, 100, 3), (12, 8, 3), (4, 2, 9)],
)
def test_signed_packing_sums_exactly_with_borrows_between_slots(
    bits: int, max_sites: int, per_coefficient: int
) -> None:
    settings = PackingSettings(clip_range=1.0, bits=bits, max_sites=max_sites)
    layout = check_packing(settings)
    assert layout.values_per_coefficient == per_coefficient
    rng = np.random.default_rng(bits)
    size = layout.values_per_chunk + 17
    levels = rng.integers(-settings.levels, settings.levels + 1, (max_sites, size))
    levels[0, :50] = settings.levels  # push some slots to the edge of their range
    levels[:, 50:100] = -settings.levels
    summed = np.zeros((2, layout.poly_modulus_degree), dtype=np.uint64)
    for row in levels:
        summed = (summed + pack(row, layout)) % np.uint64(2**layout.plain_modulus_bits)
    np.testing.assert_array_equal(unpack(summed, layout, size), levels.sum(axis=0))


def test_settings_that_could_overflow_a_slot_are_refused() -> None:
    with pytest.raises(InvalidRequest) as raised:
        check_packing(PackingSettings(clip_range=1.0, bits=40, max_sites=128))
    assert raised.value.code == "packing_overflow"
    assert "40-bit values summed over 128 sites" in raised.value.message


def test_settings_whose_noise_could_break_decryption_are_refused() -> None:
    # q / (2t) = 8191.99... and each fresh ciphertext adds at most 21.5: 381 * 21.5 = 8191.5.
    assert check_packing(PackingSettings(clip_range=1.0, bits=8, max_sites=381)).max_sites == 381
    with pytest.raises(InvalidRequest) as raised:
        check_packing(PackingSettings(clip_range=1.0, bits=8, max_sites=382))
    assert raised.value.code == "noise_budget_exceeded"
    assert "at most 381 sites" in raised.value.message
    with pytest.raises(InvalidRequest, match="at most 95 sites"):
        check_packing(PackingSettings(clip_range=1.0, bits=8, max_sites=200), BfvParameters(plain_modulus_bits=48))


@pytest.mark.parametrize(
    "settings",
    [{"clip_range": 0.0}, {"clip_range": float("inf")}, {"clip_range": 1.0, "bits": 1}, {"clip_range": 1.0, "x": 1}],
)
def test_malformed_settings_are_refused(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="validation error"):
        PackingSettings.model_validate(settings)


def _wrong_level(site: PackedBfvCodec, good: bytes, secret: ts.Context) -> bytes:
    context = secret.seal_context().data
    ciphertext = seal.Ciphertext(context)
    seal.Encryptor(context, secret.secret_key().data).encrypt_zero_symmetric(context.key_parms_id(), ciphertext)
    return site.io.save(ciphertext)


def _ntt_form(site: PackedBfvCodec, good: bytes, secret: ts.Context) -> bytes:
    ciphertext = site.load_chunk(0, good)
    site.evaluator.transform_to_ntt_inplace(ciphertext)
    return site.serialise(ciphertext)


def _three_components(site: PackedBfvCodec, good: bytes, secret: ts.Context) -> bytes:
    ciphertext = site.load_chunk(0, good)
    site.evaluator.square_inplace(ciphertext)
    return site.serialise(ciphertext)


def _transparent(site: PackedBfvCodec, good: bytes, secret: ts.Context) -> bytes:
    # A loaded chunk serialises unseeded: the last half of its packed words is c1, set to 0.
    full = site.serialise(site.load_chunk(0, good))
    c1_bytes = 15 * 8192 // 2
    return full[:-c1_bytes] + bytes(c1_bytes)


def _word_over_q(site: PackedBfvCodec, good: bytes, secret: ts.Context) -> bytes:
    # Bytes 100-114 are the third and fourth packed words (words start at 85): 2^60 - 1 > q.
    return good[:100] + b"\xff" * 15 + good[115:]


def _seal_native_truncated(site: PackedBfvCodec, good: bytes, secret: ts.Context) -> bytes:
    return site.io.save(site.load_chunk(0, good))[:-1000]


def _unknown_parms_id(site: PackedBfvCodec, good: bytes, secret: ts.Context) -> bytes:
    return good[:4] + bytes(32) + good[36:]  # parms_id follows the 4-byte compact magic


MANGLERS = {
    "garbage": lambda site, good, secret: b"garbage" * 100,
    "compact-truncated": lambda site, good, secret: good[: len(good) // 2],
    "seal-native-truncated": _seal_native_truncated,
    "word-over-q": _word_over_q,
    "unknown-parms-id": _unknown_parms_id,
    "key-level": _wrong_level,
    "ntt-form": _ntt_form,
    "three-components": _three_components,
    "transparent": _transparent,
}


@pytest.mark.parametrize("mangle", MANGLERS.values(), ids=MANGLERS.keys())
def test_bad_chunks_are_refused_by_name(
    bfv_material: KeyMaterial, site: PackedBfvCodec, aggregator: PackedBfvCodec, mangle
) -> None:
    size = 2 * CHUNK
    good = site.encrypt_update(np.full(size, 0.25))
    update = site.encrypt_update(np.full(size, 0.125))
    bad = mangle(site, update[1], tenseal_context(load_secret_context(bfv_material.secret_context)))
    with pytest.raises(
        InvalidUpdate, match=r"chunk 1 (is not a valid ciphertext|does not have this format's level or size)"
    ) as raised:
        aggregator.check_chunk(1, bad)
    assert raised.value.code == "invalid_ciphertext"
    assert raised.value.detail == {"chunk": 1}
    with pytest.raises(InvalidUpdate) as raised:
        aggregator.sum_updates([good, update, [update[0], bad]], size)
    assert raised.value.detail == {"chunk": 1, "update": 2}


def test_wrong_chunk_count_is_refused(site: PackedBfvCodec, aggregator: PackedBfvCodec) -> None:
    chunks = site.encrypt_update(np.zeros(CHUNK + 1))
    with pytest.raises(InvalidUpdate) as raised:
        aggregator.sum_updates([chunks, chunks[:1]], CHUNK + 1)
    assert raised.value.code == "wrong_chunk_count"


def test_ciphertext_under_other_parameters_is_refused(aggregator: PackedBfvCodec) -> None:
    other = create_key_material(BfvParameters(poly_modulus_degree=16384))
    foreign = codec_for(PACKED_FORMAT_ID, load_secret_context(other.secret_context), options=SETTINGS)
    with pytest.raises(InvalidUpdate):
        aggregator.check_chunk(0, foreign.encrypt_update(np.ones(10))[0])


def test_sums_are_associative_and_need_a_chunk(site: PackedBfvCodec, aggregator: PackedBfvCodec) -> None:
    updates = [site.encrypt_update(np.full(CHUNK + 5, v)) for v in (0.1, -0.2, 0.3)]
    at_once = aggregator.sum_updates(updates, CHUNK + 5)
    np.testing.assert_allclose(site.decrypt_aggregate(at_once, CHUNK + 5), 0.2, atol=3 * SETTINGS.step)
    # A partial sum is a valid chunk again: summing it with the rest decrypts to the same values.
    in_two_steps = aggregator.sum_updates([aggregator.sum_updates(updates[:2], CHUNK + 5), updates[2]], CHUNK + 5)
    np.testing.assert_array_equal(
        site.decrypt_aggregate(in_two_steps, CHUNK + 5), site.decrypt_aggregate(at_once, CHUNK + 5)
    )
    with pytest.raises(InvalidRequest, match="no chunks"):
        aggregator.sum_chunk(0, [])


def test_chunks_in_seals_own_serialisation_are_accepted(site: PackedBfvCodec, aggregator: PackedBfvCodec) -> None:
    chunk = site.encrypt_update(np.full(10, 0.25))[0]
    native = site.io.save(site.load_chunk(0, chunk))
    assert native[:2] == b"\x5e\xa1"
    summed = aggregator.sum_chunk(0, [native, chunk])
    np.testing.assert_array_equal(site.decrypt_aggregate([summed], 10), site.decrypt_aggregate([chunk], 10) * 2)


def test_evaluation_context_holds_no_key(bfv_material: KeyMaterial, aggregator: PackedBfvCodec) -> None:
    context = load_evaluation_context(bfv_material.evaluation_context)
    assert not context.has_secret_key()
    assert not context.is_private()
    assert not tenseal_context(context).has_relin_keys()
    assert not tenseal_context(context).has_galois_keys()
    # A secret key alone is 8192 coefficients x 2 primes x 8 bytes; the whole context is parameters.
    assert len(bfv_material.evaluation_context) < 1024 < len(bfv_material.secret_context)
    with pytest.raises(InvalidRequest, match="secret key"):
        load_evaluation_context(bfv_material.secret_context)
    with pytest.raises(InvalidRequest, match="no secret key"):
        aggregator.encrypt_update(np.zeros(4))
    with pytest.raises(InvalidRequest, match="no secret key"):
        aggregator.decrypt_aggregate([b"x"], 4)


def test_codec_for_needs_matching_scheme_and_settings(bfv_material: KeyMaterial, key_material: KeyMaterial) -> None:
    bfv = load_secret_context(bfv_material.secret_context)
    with pytest.raises(InvalidRequest) as raised:
        codec_for(PACKED_FORMAT_ID, bfv)
    assert raised.value.code == "missing_packing_settings"
    with pytest.raises(InvalidRequest) as raised:
        codec_for(CKKS_FORMAT_ID, bfv)
    assert raised.value.code == "scheme_mismatch"
    with pytest.raises(InvalidRequest) as raised:
        codec_for(PACKED_FORMAT_ID, load_secret_context(key_material.secret_context), options=SETTINGS)
    assert raised.value.code == "scheme_mismatch"


def test_non_finite_values_are_refused(site: PackedBfvCodec) -> None:
    with pytest.raises(InvalidRequest, match="finite"):
        site.encrypt_update(np.array([0.0, np.inf]))


def test_bfv_parameters_are_checked_and_stored_parameters_default_to_ckks() -> None:
    with pytest.raises(ValueError, match="data prime, special prime"):
        BfvParameters(coeff_mod_bit_sizes=[60, 40, 60])
    with pytest.raises(ValueError, match="128-bit"):
        BfvParameters(poly_modulus_degree=4096)
    with pytest.raises(ValueError, match="7 bits more"):
        BfvParameters(coeff_mod_bit_sizes=[55, 60], plain_modulus_bits=50)
    assert parameters_from({"poly_modulus_degree": 8192}) == CkksParameters()
    assert parameters_from(BfvParameters().model_dump()) == BfvParameters()


def test_parallel_encryption_matches_sequential_decryption(bfv_material: KeyMaterial) -> None:
    context = load_secret_context(bfv_material.secret_context)
    parallel = codec_for(PACKED_FORMAT_ID, context, workers=2, options=SETTINGS)
    try:
        values = np.random.default_rng(6).uniform(-R, R, CHUNK * 9 + 17)
        chunks = parallel.encrypt_update(values)
        assert len(chunks) == 10
        decrypted = codec_for(PACKED_FORMAT_ID, context, options=SETTINGS).decrypt_aggregate(chunks, values.size)
        assert np.max(np.abs(decrypted - values)) < SETTINGS.step
    finally:
        parallel.close()


def test_plaintext_coefficients_read_back_what_seal_holds(bfv_material: KeyMaterial) -> None:
    """The bulk read used by decryption agrees with SEAL's own per-coefficient access."""
    io = SealIO(tenseal_context(load_secret_context(bfv_material.secret_context)).seal_context().data)
    coefficients = np.random.default_rng(7).integers(0, 2**46, 8192, dtype=np.uint64)
    plain = io.load_plaintext(plaintext_bytes(coefficients))
    read = plaintext_coefficients(io.save(plain))
    np.testing.assert_array_equal(read, coefficients)
    assert [plain[i] for i in (0, 1, 4095, 8191)] == [int(read[i]) for i in (0, 1, 4095, 8191)]
    with pytest.raises(ValueError, match="not an uncompressed SEAL plaintext"):
        plaintext_coefficients(b"FHC1" + bytes(60))
