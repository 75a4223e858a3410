"""DP-SGD step time: every tensorflow-privacy path side by side with plain (non-DP) SGD.

For each model (the demo's breast-cancer MLP 30-16-2, the digits MLP 64-32-10 and a wider
784-256-10 MLP on random data) and batch size, this builds one Keras model per variant from the
same spec, weights and batches, warms each up (the first call traces, and for XLA compiles, the
train step; it is reported separately), then times single steps round-robin across the variants
so machine noise hits them alike, and reports the median step time and its ratio to non-DP SGD:

* ``non_dp``           ``build_model(spec)`` + SGD, mean loss (the baseline)
* ``microbatch_loop``  ``DPKerasSGDOptimizer`` (the previous implementation, the slow reference)
* ``vectorized``       ``VectorizedDPKerasSGDOptimizer``
* ``fast_clipping``    ``DPModel`` + layer registry (fast / ghost gradient clipping)
* ``fast_clipping_xla`` the same with ``use_xla=True``

The first section clips per example (``num_microbatches == batch_size``); the second uses 16
microbatches (the ``DPSettings`` default). The DP variants are built by
``client_agent.training.build_dp_model``, the code the agent trains with; the table marks the
path ``choose_dp_path`` picks. A benchmark, not a test: it asserts nothing about speed.

    python -m bench.dp_speed --out bench/results [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from numpy.typing import NDArray

from bench.reporting import machine_description
from client_agent.training import DPTrainingPath, build_dp_model, build_model, choose_dp_path, normalise
from fedhe.datasets import Dataset, load_bundled
from fedhe.modelspec import InputNormalisation, ModelSpec, flatten_weights, unflatten_weights
from fedhe.privacy import DPSettings

BATCH_SIZES = (32, 256)
MICROBATCHES = 16
LEARNING_RATE = 0.1
DP = {"l2_norm_clip": 1.0, "noise_multiplier": 1.1}
VARIANTS = ("non_dp", "microbatch_loop", "vectorized", "fast_clipping", "fast_clipping_xla")
DP_VARIANTS = VARIANTS[1:]


@dataclass(frozen=True)
class Budget:
    """How long each variant is timed: up to ``steps`` steps, stopping after ``seconds``."""

    warmup: int
    steps: int
    min_steps: int
    seconds: float


FULL = Budget(warmup=3, steps=40, min_steps=5, seconds=1.5)
QUICK = Budget(warmup=2, steps=10, min_steps=3, seconds=0.4)


def _models() -> list[tuple[str, ModelSpec, Dataset]]:
    """(name, spec, data) for each benchmarked model; real data where the demo has it."""
    out = []
    for name, hidden in (("breast_cancer", [16]), ("digits", [32])):
        data = load_bundled(name)
        spec = ModelSpec(
            input_dim=data.x.shape[1],
            hidden_units=hidden,
            num_classes=int(data.y.max()) + 1,
            normalisation=InputNormalisation(
                mean=data.x.mean(0).tolist(), std=np.maximum(data.x.std(0), 1e-6).tolist()
            ),
        )
        out.append((name, spec, data))
    rng = np.random.default_rng(0)
    wide = Dataset(rng.normal(size=(2048, 784)), rng.integers(0, 10, size=2048))
    out.append(("wide_784_256_10", ModelSpec(input_dim=784, hidden_units=[256], num_classes=10), wide))
    return out


def _label(spec: ModelSpec) -> str:
    return "-".join(str(n) for n in [spec.input_dim, *spec.hidden_units, spec.num_classes])


def _batches(spec: ModelSpec, data: Dataset, batch_size: int) -> tf.data.Dataset:
    """The same few full batches, repeated; each element is one whole batch (no pipeline cost)."""
    count = min(4, len(data) // batch_size)
    x = normalise(spec, data.x).astype(np.float32)[: count * batch_size]
    y = data.y[: count * batch_size]
    return (
        tf.data.Dataset.from_tensor_slices((x.reshape(count, batch_size, spec.input_dim), y.reshape(count, batch_size)))
        .cache()
        .repeat()
    )


def _compile(
    variant: str, spec: ModelSpec, weights: NDArray[Any], batch_size: int, microbatches: int
) -> tf.keras.Model:
    if variant == "non_dp":
        model = build_model(spec)
        model.set_weights(unflatten_weights(weights, spec.weight_shapes()))
        model.compile(
            optimizer=tf.keras.optimizers.legacy.SGD(learning_rate=LEARNING_RATE),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model
    path = DPTrainingPath(variant.removesuffix("_xla"))
    return build_dp_model(
        spec,
        weights,
        dp=DPSettings(num_microbatches=microbatches, **DP),
        batch_size=batch_size,
        learning_rate=LEARNING_RATE,
        path=path,
        xla=variant.endswith("_xla"),
    )


def _step_fn(model: tf.keras.Model, batches: tf.data.Dataset) -> Callable[[], float]:
    """One training step on the next batch; returns its wall time in seconds."""
    train = model.make_train_function()
    iterator = iter(batches)

    def step() -> float:
        started = time.perf_counter()
        logs = train(iterator)
        tf.nest.map_structure(lambda t: t.numpy(), logs)  # wait for the values
        return time.perf_counter() - started

    return step


def _measure(
    spec: ModelSpec, data: Dataset, batch_size: int, microbatches: int, variants: tuple[str, ...], budget: Budget
) -> dict[str, dict[str, Any]]:
    weights = flatten_weights(spec.initial_weights(0))
    batches = _batches(spec, data, batch_size)
    steps: dict[str, Callable[[], float]] = {}
    results: dict[str, dict[str, Any]] = {}
    for variant in variants:
        tf.keras.utils.set_random_seed(0)
        started = time.perf_counter()
        step = _step_fn(_compile(variant, spec, weights, batch_size, microbatches), batches)
        first = step()
        for _ in range(budget.warmup - 1):
            step()
        steps[variant] = step
        results[variant] = {"first_step_s": first, "build_and_first_step_s": time.perf_counter() - started, "times": []}
    # Round-robin, so load drift on the machine hits every variant alike; each variant stops on
    # its own after ``budget.steps`` steps, or after ``budget.seconds`` of its own step time.
    active = list(variants)
    while active:
        for variant in list(active):
            times: list[float] = results[variant]["times"]
            times.append(steps[variant]())
            done = len(times) >= budget.steps
            out_of_time = len(times) >= budget.min_steps and sum(times) > budget.seconds
            if done or out_of_time:
                active.remove(variant)
    for row in results.values():
        times = row.pop("times")
        row["steps_timed"] = len(times)
        row["median_ms"] = 1000 * statistics.median(times)
        row["p10_ms"] = 1000 * float(np.percentile(times, 10))
        row["p90_ms"] = 1000 * float(np.percentile(times, 90))
    return results


def _cell(row: dict[str, Any], base: float | None, chosen: bool) -> str:
    text = f"{row['median_ms']:.2f} ms"
    if base is not None:
        text += f" (**{row['median_ms'] / base:.1f}×**)" if chosen else f" ({row['median_ms'] / base:.1f}×)"
    return text


def _markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    lines = [
        "# DP-SGD step time: tensorflow-privacy paths vs plain SGD",
        "",
        f"Machine: {report['machine']['description']}; TensorFlow {report['machine']['tensorflow']}, "
        f"tensorflow-privacy {report['machine']['tensorflow_privacy']}, Python {report['machine']['python']}, "
        f"{report['machine']['intra_op_threads']} TF intra-op threads.",
        "",
        f"Median wall time of one training step ({settings['mode']} run: up to {settings['steps']} timed steps, "
        f"or {settings['seconds_per_variant']} s of steps, per variant after {settings['warmup']} warm-up steps, "
        "round-robin across variants). In brackets: DP step time / non-DP step time. "
        "**Bold**: the path `choose_dp_path` picks for training.",
        "",
    ]
    for section in report["sections"]:
        lines += [f"## {section['title']}", ""]
        names = [v for v in VARIANTS if any(v in row["variants"] for row in section["rows"])]
        lines.append("| model | batch | microbatches | " + " | ".join(names) + " | chosen path | first step, chosen |")
        lines.append("|" + "---|" * (len(names) + 5))
        for row in section["rows"]:
            base = row["variants"]["non_dp"]["median_ms"] if "non_dp" in row["variants"] else None
            cells = [row["model"], str(row["batch_size"]), str(row["num_microbatches"])]
            for name in names:
                result = row["variants"].get(name)
                chosen = name == row["chosen_variant"]
                cells.append("" if result is None else _cell(result, None if name == "non_dp" else base, chosen))
            chosen_row = row["variants"].get(row["chosen_variant"])
            cells += [row["chosen_path"], "" if chosen_row is None else f"{chosen_row['first_step_s']:.2f} s"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## First step (build, trace and, for XLA, compile the train step), seconds",
        "",
        "| model | batch | microbatches | " + " | ".join(VARIANTS) + " |",
        "|" + "---|" * (len(VARIANTS) + 3),
    ]
    for section in report["sections"]:
        for row in section["rows"]:
            cells = [row["model"], str(row["batch_size"]), str(row["num_microbatches"])]
            for name in VARIANTS:
                result = row["variants"].get(name)
                cells.append("" if result is None else f"{result['build_and_first_step_s']:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "All DP variants compute the same mechanism (clip each microbatch's gradient to "
        f"{DP['l2_norm_clip']}, add N(0, (clip·σ)²) to the sum, divide by the number of microbatches; "
        f"σ = {DP['noise_multiplier']}); tests/unit/test_training.py checks they agree to float32 rounding.",
        "'first step' includes tracing (and, for XLA, compiling) the train step, paid once per round "
        "because the agent builds a fresh model each round.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--quick", action="store_true", help="fewer timed steps (about a minute on 2 cores)")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL
    tf.get_logger().setLevel("ERROR")
    started = time.perf_counter()

    sections = []
    for title, per_example in (
        ("Per-example clipping (num_microbatches = batch size)", True),
        (f"{MICROBATCHES} microbatches per batch", False),
    ):
        variants = VARIANTS if per_example else ("non_dp", "microbatch_loop", "vectorized", "fast_clipping")
        rows = []
        for name, spec, data in _models():
            for batch_size in BATCH_SIZES:
                microbatches = batch_size if per_example else MICROBATCHES
                dp = DPSettings(num_microbatches=microbatches, **DP)
                chosen = choose_dp_path(spec, dp, batch_size)
                print(f"dp_speed: {name} batch {batch_size} microbatches {microbatches} ...", flush=True)
                measured = _measure(spec, data, batch_size, microbatches, variants, budget)
                base = measured["non_dp"]["median_ms"]
                for variant in DP_VARIANTS:
                    if variant in measured:
                        measured[variant]["ratio_to_non_dp"] = measured[variant]["median_ms"] / base
                rows.append(
                    {
                        "model": f"{name} ({_label(spec)})",
                        "batch_size": batch_size,
                        "num_microbatches": microbatches,
                        "chosen_path": chosen.value,
                        # The agent trains without XLA (see training._FAST_CLIPPING_XLA).
                        "chosen_variant": chosen.value,
                        "variants": measured,
                    }
                )
        sections.append({"title": title, "rows": rows})

    report = {
        "machine": {
            "description": machine_description(),
            "cores": os.cpu_count(),
            "tensorflow": tf.__version__,
            "tensorflow_privacy": _tfp_version(),
            "python": platform.python_version(),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default (all cores)",
        },
        "settings": {
            "mode": "quick" if args.quick else "full",
            "warmup": budget.warmup,
            "steps": budget.steps,
            "min_steps": budget.min_steps,
            "seconds_per_variant": budget.seconds,
            "learning_rate": LEARNING_RATE,
            **DP,
        },
        "sections": sections,
        "total_seconds": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dp_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "dp_speed.md").write_text(_markdown(report))
    print(f"dp_speed: wrote {args.out / 'dp_speed.md'} in {report['total_seconds']:.0f} s")


def _tfp_version() -> str:
    from importlib.metadata import version

    return version("tensorflow-privacy")


if __name__ == "__main__":
    main()
