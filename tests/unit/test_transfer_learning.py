"""Jobs that start from given weights and train only chosen layers: the model side, the site's
source of the weights, the global chain and the aggregator's store, without HTTP."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from pydantic import ValidationError

from aggregator.initial_weights import InitialWeightsStore, require_initial_weights
from aggregator.repository import AggregatorRepository
from aggregator.tables import AggregatorBase
from client_agent.dp_sgd import ClippingPath, DPParameters, DPSGDRun
from client_agent.global_chain import GlobalModelChain
from client_agent.initial_weights import InitialWeightsSource
from client_agent.models import (
    build_model,
    fingerprint,
    flat_weights,
    initial_weights,
    num_parameters,
    trainable_mask,
    weights_from_file,
    weights_sha256,
)
from fedhe.db import SessionFactory, make_engine
from fedhe.errors import InvalidRequest, NotFound
from fedhe.global_model import DecodedAggregate
from fedhe.modelspec import ModelSpec
from fedhe.schemas import JobPublic
from tests.factories import job_create

MOBILENET = {"architecture": "mobilenet_v2", "alpha": 0.35, "input_shape": (32, 32, 3), "num_classes": 10}
CNN = {"architecture": "cnn", "input_shape": (16, 16, 3), "num_classes": 4, "hidden_units": [8]}
KEY = "key-" + "0" * 32


def _trainable_names(spec: ModelSpec) -> list[str]:
    model = build_model(spec)
    return [layer.name for layer in model.layers if layer.trainable and layer.weights]


@pytest.mark.slow  # builds a MobileNet: seconds of CPU (make test runs it, make test-unit does not)
def test_the_head_and_the_last_blocks_train_and_nothing_else() -> None:
    head = ModelSpec(**MOBILENET, trainable={})
    assert _trainable_names(head) == ["predictions"]
    two = ModelSpec(**MOBILENET, trainable={"last_blocks": 2})
    assert _trainable_names(two) == [
        *(f"block_16_{part}" for part in ("expand", "expand_BN", "depthwise", "depthwise_BN", "project", "project_BN")),
        "Conv_1",
        "Conv_1_bn",
        "predictions",
    ]
    named = ModelSpec(**MOBILENET, trainable={"layers": ["block_15_project*"]})
    assert _trainable_names(named) == ["block_15_project", "block_15_project_BN", "predictions"]
    cnn = build_model(ModelSpec(**CNN, trainable={"last_blocks": 1}))
    weighted = [layer for layer in cnn.layers if layer.weights]
    assert [(type(layer).__name__, layer.trainable) for layer in weighted] == [
        ("Conv2D", False),
        ("Conv2D", False),
        ("Dense", True),
        ("Dense", True),
    ]


@pytest.mark.slow  # builds a MobileNet: seconds of CPU (make test runs it, make test-unit does not)
@pytest.mark.parametrize(
    ("trainable", "message"),
    [({"last_blocks": 60}, "has 20 blocks before its head"), ({"layers": ["no_such_*"]}, "matches no layer")],
)
def test_trainable_layers_that_do_not_exist_are_refused_by_name(trainable: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message) as caught:
        build_model(ModelSpec(**MOBILENET, trainable=trainable))
    assert caught.value.code == "invalid_trainable_layers"


@pytest.mark.slow  # builds a MobileNet: seconds of CPU (make test runs it, make test-unit does not)
def test_an_update_carries_only_the_trainable_values_and_the_fingerprint_counts_them() -> None:
    spec = ModelSpec(**MOBILENET, trainable={"last_blocks": 1})
    pinned = spec.model_copy(update={"fingerprint": fingerprint(spec, 0)})
    model = build_model(pinned)
    mask = trainable_mask(model)
    # Conv_1 (112 x 1280 kernel, no bias), its γ and β, and the classifier.
    expected = 112 * 1280 + 2 * 1280 + 1280 * 10 + 10
    assert int(mask.sum()) == pinned.num_update_values() == expected == pinned.fingerprint.num_trainable_parameters
    assert pinned.num_parameters() == num_parameters(model) == 423_018
    job = job_create(KEY, name="t", model=pinned)
    assert job.round_num_values(0) == expected
    with pytest.raises(InvalidRequest, match="needs the fingerprint"):
        spec.num_update_values()


@pytest.mark.slow  # builds a MobileNet: seconds of CPU (make test runs it, make test-unit does not)
def test_dp_sgd_on_the_fast_path_changes_exactly_the_trainable_values() -> None:
    spec = ModelSpec(**MOBILENET, trainable={"last_blocks": 1})
    model = build_model(spec)
    before, mask = flat_weights(model), trainable_mask(model)
    rng = np.random.default_rng(0)
    run = DPSGDRun(
        model, dp=DPParameters(l2_norm_clip=1.0, noise_multiplier=1.0), batch_size=8, num_examples=16, learning_rate=0.1
    )
    assert run.path is ClippingPath.FAST
    run.train(rng.random((16, 32, 32, 3), dtype=np.float32), rng.integers(0, 10, 16), epochs=1)
    changed = flat_weights(model) != before
    assert (int(changed.sum()), int((changed & ~mask).sum())) == (int(mask.sum()), 0)


def _saved(tmp_path: Path, spec: ModelSpec, seed: int) -> tuple[Path, np.ndarray]:
    model = build_model(spec)
    model.set_weights([np.random.default_rng(seed).standard_normal(w.shape) for w in model.get_weights()])
    path = tmp_path / f"model-{seed}.keras"
    model.save(path)
    return path, flat_weights(model)


def test_weights_come_from_a_keras_file_an_h5_file_or_a_flat_vector_alike(tmp_path: Path) -> None:
    spec = ModelSpec(**CNN)
    keras_file, expected = _saved(tmp_path, spec, 1)
    model = build_model(spec)
    model.set_weights(tf.keras.models.load_model(keras_file).get_weights())
    model.save_weights(tmp_path / "weights.h5")
    np.save(tmp_path / "weights.npy", expected)
    for name in (keras_file.name, "weights.h5", "weights.npy"):
        np.testing.assert_array_equal(weights_from_file(spec, tmp_path / name), expected)


def test_a_weights_file_that_does_not_fit_is_refused_naming_the_file_and_what_differs(tmp_path: Path) -> None:
    spec = ModelSpec(**CNN)
    other, _ = _saved(tmp_path, ModelSpec(**{**CNN, "num_classes": 5}), 2)
    with pytest.raises(InvalidRequest, match=r"model-2.keras: .*array 6 is \(8, 5\), the spec's \(8, 4\)") as caught:
        weights_from_file(spec, other)
    assert caught.value.code == "initial_weights_mismatch"
    _, vector = _saved(tmp_path, spec, 3)
    np.save(tmp_path / "short.npy", vector[:-1])
    with pytest.raises(InvalidRequest, match=f"short.npy: holds {vector.size - 1} values, the model has {vector.size}"):
        weights_from_file(spec, tmp_path / "short.npy")
    vector[5] = np.nan
    np.save(tmp_path / "nan.npy", vector)
    with pytest.raises(InvalidRequest, match=r"nan\.npy: holds NaN"):
        weights_from_file(spec, tmp_path / "nan.npy")
    (tmp_path / "cut.keras").write_bytes(other.read_bytes()[:1000])
    with pytest.raises(InvalidRequest, match=r"cut\.keras: cannot read weights"):
        weights_from_file(spec, tmp_path / "cut.keras")


def _given_spec(vector: np.ndarray, **changes: Any) -> ModelSpec:
    spec = ModelSpec(**CNN, initial_weights_sha256=weights_sha256(vector), **changes)
    return spec.model_copy(update={"fingerprint": fingerprint(spec, 0, given=vector)})


def test_round_zero_is_the_given_vector_and_nothing_else(tmp_path: Path) -> None:
    _, vector = _saved(tmp_path, ModelSpec(**CNN), 4)
    spec = _given_spec(vector)
    assert spec.fingerprint is not None
    assert spec.fingerprint.initial_weights_sha256 == spec.initial_weights_sha256
    np.testing.assert_array_equal(initial_weights(spec, 0, given=vector), vector)
    other = vector.copy()
    other[0] += 1e-12
    with pytest.raises(InvalidRequest, match="not the job's weights"):
        initial_weights(spec, 0, given=other)
    with pytest.raises(InvalidRequest, match="hold 9 values"):
        initial_weights(spec, 0, given=vector[:9])
    with pytest.raises(ValidationError, match=r"fingerprint\.initial_weights_sha256 must be initial_weights_sha256"):
        ModelSpec(**{**spec.model_dump(), "initial_weights_sha256": "0" * 64})


class _Aggregator:
    def __init__(self, data: bytes):
        self.data = data
        self.calls = 0

    def __call__(self, sha256: str, num_values: int) -> bytes:
        self.calls += 1
        return self.data


def test_a_site_uses_its_own_file_or_a_download_it_checks_and_keeps(tmp_path: Path) -> None:
    path, vector = _saved(tmp_path, ModelSpec(**CNN), 5)
    spec = _given_spec(vector)
    own = tmp_path / "own"
    own.mkdir()
    (own / "unrelated.npy").write_bytes(b"not a vector")
    path.rename(own / "backbone.keras")
    nothing = _Aggregator(b"")
    np.testing.assert_array_equal(InitialWeightsSource(nothing, tmp_path / "a", local_dir=own)(spec), vector)
    assert nothing.calls == 0

    served = _Aggregator(vector.astype("<f8").tobytes())
    source = InitialWeightsSource(served, tmp_path / "b")
    np.testing.assert_array_equal(source(spec), vector)
    np.testing.assert_array_equal(source(spec), vector)
    assert served.calls == 1  # kept after the first download
    kept = tmp_path / "b" / f"initial-weights-{spec.initial_weights_sha256}.f8"
    assert kept.stat().st_mode & 0o777 == 0o600

    truncated = InitialWeightsSource(_Aggregator(vector.astype("<f8").tobytes()[:-8]), tmp_path / "c")
    with pytest.raises(InvalidRequest, match="truncated or not this job's") as caught:
        truncated(spec)
    assert caught.value.code == "initial_weights_mismatch"
    changed = vector.copy()
    changed[-1] = 0.5
    with pytest.raises(InvalidRequest, match="not the job's weights"):
        InitialWeightsSource(_Aggregator(changed.astype("<f8").tobytes()), tmp_path / "d")(spec)
    assert not (tmp_path / "c").exists()
    assert not (tmp_path / "d").exists()


def _job(spec: ModelSpec) -> JobPublic:
    return JobPublic.model_validate(
        {
            "name": "t",
            "key_id": KEY,
            "model": spec.model_dump(),
            "format_id": "bfv-packed-v1",
            "id": "job-" + "0" * 16,
            "federation_id": "fed-" + "0" * 16,
            "environment": {"python": "3", "tensorflow": "2", "tensorflow_privacy": "0", "tenseal": "0", "fedhe": "0"},
            "status": "running",
            "current_round": 0,
            "created_at": "2026-12-07T00:00:00Z",
            "num_parameters": spec.num_parameters(),
        }
    )


def test_the_global_chain_applies_aggregates_of_the_trainable_values_and_keeps_the_rest(tmp_path: Path) -> None:
    _, vector = _saved(tmp_path, ModelSpec(**CNN), 6)
    spec = _given_spec(vector, trainable={"last_blocks": 0})
    job = _job(spec)
    chain = GlobalModelChain(job, tmp_path / "chain.npz", given_weights=lambda _: vector)
    mask = chain.trainable_mask
    assert mask is not None
    assert int(mask.sum()) == job.round_num_values(0) == 8 * 4 + 4
    change = np.arange(vector.size, dtype=np.float64)
    np.testing.assert_array_equal(chain.update_values(change), change[mask])
    mean = np.full(int(mask.sum()), 0.25)
    chain.apply(DecodedAggregate(round_number=0, kind="training", values=mean, total_samples=10, num_inputs=2))
    np.testing.assert_array_equal(chain.weights[~mask], vector[~mask])
    np.testing.assert_allclose(chain.weights[mask], vector[mask] + 0.25)
    reloaded = GlobalModelChain(job, tmp_path / "chain.npz", given_weights=lambda _: vector[:1])
    np.testing.assert_array_equal(reloaded.weights, chain.weights)


def test_the_aggregator_stores_only_whole_finite_vectors_under_their_own_hash(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/agg.db")
    AggregatorBase.metadata.create_all(engine)
    sessions = SessionFactory(engine)
    store = InitialWeightsStore(sessions)
    data = np.linspace(-1, 1, 50).astype("<f8").tobytes()
    sha = hashlib.sha256(data).hexdigest()
    refusals = [
        (data[:-3], sha, "not a whole number of them"),
        (data[:-8], sha, "not the .* in the path"),
        (np.array([1.0, np.inf]).astype("<f8").tobytes(), None, "1 NaN or infinite values \\(the first at index 1\\)"),
    ]
    for body, named, message in refusals:
        with pytest.raises(InvalidRequest, match=message) as caught:
            store.put(named or hashlib.sha256(body).hexdigest(), body, actor="account:admin")
        assert caught.value.code == "initial_weights_mismatch"
    stored, new = store.put(sha, data, actor="account:admin")
    again, new_again = store.put(sha, data, actor="account:other")
    assert (stored.num_values, stored.created_by, new, new_again) == (50, "account:admin", True, False)
    assert again.created_by == "account:admin"
    assert store.get(sha) == data
    with pytest.raises(NotFound):
        store.get("0" * 64)
    with sessions.transaction() as session:
        repo = AggregatorRepository(session)
        assert [(e.action, e.actor) for e in repo.audit_events(10)] == [("initial_weights.store", "account:admin")]
        require_initial_weights(repo, sha, 50)
        with pytest.raises(InvalidRequest, match="hold 50 values, the job's model 51"):
            require_initial_weights(repo, sha, 51)
        with pytest.raises(InvalidRequest, match="is not stored here: upload the weights first") as caught:
            require_initial_weights(repo, "1" * 64, 50)
        assert caught.value.code == "initial_weights_not_found"
