"""Imaging under DP: zoo models from scratch against a pre-trained backbone fine-tuned.

scikit-learn's digits as 32 × 32 × 3 images (8 × 8 grey levels upscaled, as a site's PNGs are
read): digits 0–4 are the public set a MobileNetV2 (α 0.35) is pre-trained on without DP
(``client_agent.pretraining``, as ``fedhe pretrain`` runs it), digits 5–9 the sites' (3 sites;
a fifth held out for testing). Each federated row is an in-process federation
(``client_agent.simulation``: the agent's own DP-SGD, sample-weighted averaging), IID or
Dirichlet α = 0.5. Beside them, the same start trained centrally on the pooled site data:
without DP (Adam), and with tensorflow-privacy's own ``VectorizedDPKerasSGDOptimizer`` at a
noise multiplier chosen so that its ε equals the federation's largest per-site ε.

Bytes per round are one site's upload under the packed codec (measured: the update encrypted
with a real BFV key) of the values an update carries: every value of a model without trainable
layers, only the trainable ones otherwise; seconds per round are the three sites' training,
run one after another.

    FEDHE_INSECURE_DP_SEED=test-only:1 python -m bench.transfer --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from numpy.typing import NDArray

from bench.reporting import machine_description, write_markdown_table
from client_agent.datasets import Dataset, digits_as_images, partition_dirichlet, partition_iid, split
from client_agent.dp_randomness import SWITCH
from client_agent.evaluation import evaluate
from client_agent.models import build_model, initial_weights, num_parameters, num_trainable, weights_from_file
from client_agent.pretraining import pretrain
from client_agent.simulation import FederatedSettings, run_federation
from client_agent.training import load_model
from fedhe.errors import InvalidRequest
from fedhe.he import BfvParameters, PackingSettings, codec_for, create_key_material, load_secret_context
from fedhe.modelspec import InputNormalisation, ModelSpec
from fedhe.privacy import DPSettings, epsilon_spent, local_training_pass

SITES = 3
SIZE = 32
NORMALISATION = InputNormalisation(mean=[127.5] * 3, std=[127.5] * 3)
DP = DPSettings(noise_multiplier=1.0, l2_norm_clip=1.0)
COLUMNS = [
    "model",
    "start",
    "trains",
    "partition",
    "DP",
    "accuracy",
    "ε per site",
    "values per upload",
    "bytes per round",
    "s per round",
]


@dataclass(frozen=True)
class Setup:
    """A row family: an architecture, where it starts and what trains."""

    name: str
    spec: ModelSpec
    pretrained: bool
    settings: FederatedSettings
    plain_learning_rate: float  # without clipping, the DP rows' rate diverges


def _images(dataset: Dataset) -> Dataset:
    grey = tf.image.resize(np.asarray(dataset.x, dtype=np.float32), (SIZE, SIZE), method="bilinear").numpy()
    return Dataset(np.repeat(np.round(grey), 3, axis=-1), dataset.y)


def _spec(architecture: str, trainable: dict[str, Any] | None = None, **fields: Any) -> ModelSpec:
    return ModelSpec(
        architecture=architecture,
        input_shape=(SIZE, SIZE, 3),
        num_classes=10,
        normalisation=NORMALISATION,
        trainable=trainable,
        **fields,
    )


def setups(quick: bool) -> list[Setup]:
    rounds = 2 if quick else 4
    small = FederatedSettings(rounds=rounds, local_epochs=2, batch_size=32, learning_rate=0.5, dp=DP)
    # One local epoch for the MobileNets trained whole: the slowest rows of the table.
    whole = replace(small, local_epochs=1)
    fine_tune = replace(small, learning_rate=0.2)
    return [
        Setup("cnn", _spec("cnn", conv_filters=[16, 32], hidden_units=[64]), False, small, 0.05),
        Setup("mobilenet_v2", _spec("mobilenet_v2", alpha=0.35), False, whole, 0.01),
        Setup("mobilenet_v3_small", _spec("mobilenet_v3_small", alpha=0.75), False, whole, 0.01),
        Setup("mobilenet_v2", _spec("mobilenet_v2", {"last_blocks": 0}, alpha=0.35), True, fine_tune, 0.05),
        Setup("mobilenet_v2", _spec("mobilenet_v2", {"last_blocks": 2}, alpha=0.35), True, fine_tune, 0.05),
    ]


def _trains(setup: Setup) -> str:
    if setup.spec.trainable is None:
        return "all"
    blocks = setup.spec.trainable.last_blocks
    return "head" if blocks == 0 else f"head + last {blocks} blocks"


class UploadBytes:
    """One site's upload size for an update of a given length, measured with a real BFV key."""

    def __init__(self) -> None:
        secret = load_secret_context(create_key_material(BfvParameters()).secret_context)
        self._codec = codec_for("bfv-packed-v1", secret, 1, options=PackingSettings(clip_range=1.0, max_sites=128))
        self._known: dict[int, int] = {}

    def __call__(self, num_values: int) -> int:
        if num_values not in self._known:
            chunks = self._codec.encrypt_update(np.zeros(num_values))
            self._known[num_values] = sum(len(chunk) for chunk in chunks)
        return self._known[num_values]


def _central_dp_sgd(
    spec: ModelSpec, start: NDArray[Any], train: Dataset, test: Dataset, settings: FederatedSettings, target: float
) -> tuple[float | str, float]:
    """tensorflow-privacy's DP-SGD on the pooled data at ε = ``target``: (accuracy, ε reached)."""
    import tensorflow_privacy

    epochs = settings.rounds * settings.local_epochs
    batch = settings.batch_size
    low, high = 0.3, 50.0
    for _ in range(30):  # the smallest noise whose ε stays within the target
        middle = (low + high) / 2
        passes = [local_training_pass(num_samples=len(train), batch_size=batch, epochs=epochs, noise_multiplier=middle)]
        low, high = (low, middle) if epsilon_spent(passes, DP.delta) <= target else (middle, high)
    sigma = high
    passes = [local_training_pass(num_samples=len(train), batch_size=batch, epochs=epochs, noise_multiplier=sigma)]
    model = load_model(spec, start)
    optimiser = tensorflow_privacy.VectorizedDPKerasSGDOptimizer(
        l2_norm_clip=DP.l2_norm_clip,
        noise_multiplier=sigma,
        num_microbatches=batch,
        learning_rate=settings.learning_rate,
    )
    loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=tf.keras.losses.Reduction.NONE)
    model.compile(optimizer=optimiser, loss=loss)
    usable = len(train) - len(train) % batch
    order = np.random.default_rng(0)  # shuffles data for a baseline; the noise is tensorflow-privacy's own
    x, y = np.asarray(train.x, dtype=np.float32), np.asarray(train.y)
    for _ in range(epochs):
        rows = order.permutation(len(train))[:usable]
        model.fit(x[rows], y[rows], batch_size=batch, epochs=1, shuffle=False, verbose=0)
    return _accuracy(spec, np.concatenate([w.ravel() for w in model.get_weights()]), test), epsilon_spent(
        passes, DP.delta
    )


def _central_plain(
    spec: ModelSpec, start: NDArray[Any], train: Dataset, test: Dataset, settings: FederatedSettings
) -> float | str:
    model = load_model(spec, start)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(1e-3),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    order = np.random.default_rng(0)
    x, y = np.asarray(train.x, dtype=np.float32), np.asarray(train.y)
    for _ in range(settings.rounds * settings.local_epochs):
        rows = order.permutation(len(train))
        model.fit(x[rows], y[rows], batch_size=settings.batch_size, epochs=1, shuffle=False, verbose=0)
    return _accuracy(spec, np.concatenate([w.ravel() for w in model.get_weights()]), test)


def _accuracy(spec: ModelSpec, weights: NDArray[Any], test: Dataset) -> float | str:
    try:
        return evaluate(spec, weights, test)["accuracy"]
    except InvalidRequest as exc:
        if exc.code != "model_diverged":
            raise
        return "diverged"


def measure(quick: bool, workdir: Path) -> list[dict[str, Any]]:
    digits = _images(digits_as_images())
    public = digits.subset(np.flatnonzero(digits.y < 5))
    pool, test = split(digits.subset(np.flatnonzero(digits.y >= 5)), 0.2, seed=0)
    partitions = {
        "IID": partition_iid(len(pool), SITES, seed=0),
        "Dirichlet α=0.5": partition_dirichlet(pool.y, SITES, 0.5, seed=0, min_size=64),
    }
    upload_bytes = UploadBytes()
    backbone_spec = _spec("mobilenet_v2", alpha=0.35)
    print("transfer: pre-training MobileNetV2 on digits 0-4 ...", flush=True)
    done = pretrain(backbone_spec, public, workdir / "backbone.keras", epochs=3 if quick else 10)
    backbone = weights_from_file(backbone_spec, done.path)
    rows: list[dict[str, Any]] = [
        {
            "model": "mobilenet_v2",
            "start": "pre-training itself (digits 0-4, no DP)",
            "trains": "all",
            "partition": "central",
            "DP": "no",
            "accuracy": done.validation_accuracy,
            "values per upload": done.num_parameters,
        }
    ]
    for setup in setups(quick):
        start = backbone if setup.pretrained else initial_weights(setup.spec, 0)
        origin = "pre-trained on digits 0-4" if setup.pretrained else "scratch"
        model = build_model(setup.spec)
        # Without trainable layers an update carries every value, BatchNormalization's statistics too.
        sent = num_parameters(model) if setup.spec.trainable is None else num_trainable(model)
        common = {"model": setup.name, "start": origin, "trains": _trains(setup), "values per upload": sent}
        epsilons: list[float] = []
        for partition, parts in partitions.items():
            sites = [pool.subset(part) for part in parts]
            for private in (False, True):
                print(f"transfer: {setup.name} {origin} {_trains(setup)} {partition} DP={private} ...", flush=True)
                settings = (
                    setup.settings
                    if private
                    else replace(setup.settings, dp=None, learning_rate=setup.plain_learning_rate)
                )
                run = run_federation(setup.spec, sites, settings, start)
                epsilons = run.epsilons or epsilons
                rows.append(
                    {
                        **common,
                        "partition": partition,
                        "DP": "yes" if private else "no",
                        "accuracy": _accuracy(setup.spec, run.weights, test),
                        "ε per site": ", ".join(f"{e:.2f}" for e in run.epsilons) if private else "",
                        "bytes per round": upload_bytes(sent),
                        "s per round": run.seconds / settings.rounds,
                    }
                )
        print(f"transfer: {setup.name} {origin} {_trains(setup)} centrally ...", flush=True)
        plain = _central_plain(setup.spec, start, pool, test, setup.settings)
        rows.append({**common, "partition": "central", "DP": "no", "accuracy": plain})
        accuracy, reached = _central_dp_sgd(setup.spec, start, pool, test, setup.settings, max(epsilons))
        rows.append(
            {
                **common,
                "partition": "central",
                "DP": "yes (tensorflow-privacy)",
                "accuracy": accuracy,
                "ε per site": f"{reached:.2f}",
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    tf.get_logger().setLevel("ERROR")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        rows = measure(args.quick, Path(workdir))
    seconds = time.perf_counter() - started
    machine = machine_description()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transfer.json").write_text(
        json.dumps({"machine": machine, "rows": rows, "seconds": seconds}, indent=2) + "\n"
    )
    noise = (
        f"DP noise from {SWITCH}={os.environ[SWITCH]} (reproducible)."
        if SWITCH in os.environ
        else "Fresh DP noise from OS entropy (each run differs by a few points)."
    )
    notes = [
        f"Test accuracy on held-out digits 5–9 (chance 0.20). DP: σ {DP.noise_multiplier}, C {DP.l2_norm_clip}, "
        f"ε at δ = {DP.delta:g} (PLD). {noise} The central DP row's ε is its own, for the pooled data. "
        f"Total {seconds:.0f} s."
    ]
    write_markdown_table(args.out / "transfer.md", "Imaging under DP: from scratch and fine-tuned", machine, rows,
                         COLUMNS, notes)  # fmt: skip
    print(f"transfer: wrote {args.out / 'transfer.md'} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
