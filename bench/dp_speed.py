"""DP-SGD step time against the same step without DP, per model, on the path training takes.

For each model and expected batch size this builds two ``client_agent.dp_sgd.DPSGDRun``s on
copies of the same model and data: one with DP (Poisson batch, per-example clipping on the
path ``choose_clipping_path`` picks, Gaussian noise) and one without (the same Poisson batch,
padding and update, no clipping and no noise). Each is warmed up (the first step traces the
step function; reported separately), then single steps are timed round-robin so machine noise
hits both alike. Reported: median step time and the ratio DP / non-DP.

    python -m bench.dp_speed --out bench/results [--quick]

A benchmark, not a test: it asserts nothing about speed.
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
from client_agent.dp_sgd import DPParameters, DPSGDRun
from client_agent.models import build_model
from fedhe.modelspec import ModelSpec

LEARNING_RATE = 0.05
DP = DPParameters(l2_norm_clip=1.0, noise_multiplier=1.1)
NUM_EXAMPLES = 2048


@dataclass(frozen=True)
class Budget:
    """How long each variant is timed: up to ``steps`` steps, stopping after ``seconds``."""

    warmup: int
    steps: int
    min_steps: int
    seconds: float
    batch_sizes: tuple[int, ...]


FULL = Budget(warmup=3, steps=40, min_steps=5, seconds=3.0, batch_sizes=(32, 128))
QUICK = Budget(warmup=2, steps=6, min_steps=3, seconds=0.5, batch_sizes=(16,))


def _models() -> list[tuple[str, ModelSpec]]:
    """One spec per zoo architecture; the MobileNets at their smallest input, 32 x 32 x 3, alpha 0.35."""
    small = {"input_shape": (32, 32, 3), "alpha": 0.35, "num_classes": 10}
    return [
        ("logistic 30-2", ModelSpec(architecture="logistic", input_shape=(30,), num_classes=2)),
        ("mlp 64-32-10", ModelSpec(input_shape=(64,), hidden_units=[32], num_classes=10)),
        ("mlp 784-256-10", ModelSpec(input_shape=(784,), hidden_units=[256], num_classes=10)),
        ("cnn 8x8x1 16-32", ModelSpec(architecture="cnn", input_shape=(8, 8, 1), num_classes=10)),
        ("mobilenet_v2 32x32x3 a0.35", ModelSpec(architecture="mobilenet_v2", **small)),
        ("mobilenet_v3_small 32x32x3 a0.35", ModelSpec(architecture="mobilenet_v3_small", **small)),
    ]


def _step_fn(spec: ModelSpec, dp: DPParameters | None, batch_size: int) -> tuple[Callable[[], float], DPSGDRun]:
    model = build_model(spec)
    rng = np.random.default_rng(0)
    x: NDArray[Any] = rng.normal(size=(NUM_EXAMPLES, *model.input_shape[1:])).astype(np.float32)
    y = rng.integers(0, spec.num_classes, size=NUM_EXAMPLES)
    # Random data: only the step's cost is measured.
    run = DPSGDRun(model, dp=dp, batch_size=batch_size, num_examples=NUM_EXAMPLES, learning_rate=LEARNING_RATE)

    def step() -> float:
        rows = run.poisson_batch(NUM_EXAMPLES)
        started = time.perf_counter()
        run.step(x[rows], y[rows])
        return time.perf_counter() - started

    return step, run


def _measure(spec: ModelSpec, batch_size: int, budget: Budget) -> dict[str, Any]:
    steps: dict[str, Callable[[], float]] = {}
    row: dict[str, Any] = {}
    for variant, dp in (("non_dp", None), ("dp", DP)):
        started = time.perf_counter()
        step, run = _step_fn(spec, dp, batch_size)
        first = step()
        for _ in range(budget.warmup - 1):
            step()
        steps[variant] = step
        row[variant] = {"first_step_s": first, "build_and_warmup_s": time.perf_counter() - started, "times": []}
        if dp is not None:
            row["path"] = str(run.path)
    active = list(steps)
    while active:
        for variant in list(active):
            times: list[float] = row[variant]["times"]
            times.append(steps[variant]())
            if len(times) >= budget.steps or (len(times) >= budget.min_steps and sum(times) > budget.seconds):
                active.remove(variant)
    for variant in steps:
        times = row[variant].pop("times")
        row[variant].update(
            steps_timed=len(times),
            median_ms=1000 * statistics.median(times),
            p10_ms=1000 * float(np.percentile(times, 10)),
            p90_ms=1000 * float(np.percentile(times, 90)),
        )
    row["ratio"] = row["dp"]["median_ms"] / row["non_dp"]["median_ms"]
    return row


def _markdown(report: dict[str, Any]) -> str:
    machine, settings = report["machine"], report["settings"]
    lines = [
        "# DP-SGD step time against the same step without DP",
        "",
        f"Machine: {machine['description']}; TensorFlow {machine['tensorflow']}, tensorflow-privacy "
        f"{machine['tensorflow_privacy']}, Python {machine['python']}.",
        "",
        f"Median wall time of one step ({settings['mode']} run: up to {settings['steps']} timed steps or "
        f"{settings['seconds_per_variant']} s per variant after {settings['warmup']} warm-up steps, round-robin). "
        f"Poisson batches from {NUM_EXAMPLES} examples; σ = {DP.noise_multiplier}, C = {DP.l2_norm_clip}. "
        "The non-DP step is the same code without clipping or noise.",
        "",
        "| model | parameters | expected batch | DP path | non-DP step | DP step | DP / non-DP | first DP step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['model']} | {row['parameters']:,} | {row['batch_size']} | {row['path']} | "
            f"{row['non_dp']['median_ms']:.2f} ms | {row['dp']['median_ms']:.2f} ms | **{row['ratio']:.1f}×** | "
            f"{row['dp']['first_step_s']:.1f} s |"
        )
    lines += [
        "",
        "'first DP step' includes tracing the step function, paid once per local training run (one per round).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--quick", action="store_true", help="one batch size, few steps (2-3 minutes on 2 cores)")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL
    tf.get_logger().setLevel("ERROR")
    started = time.perf_counter()
    rows = []
    for name, spec in _models():
        for batch_size in budget.batch_sizes:
            print(f"dp_speed: {name} batch {batch_size} ...", flush=True)
            row = _measure(spec, batch_size, budget)
            rows.append(
                {"model": name, "parameters": build_model(spec).count_params(), "batch_size": batch_size, **row}
            )
    report = {
        "machine": {
            "description": machine_description(),
            "cores": os.cpu_count(),
            "tensorflow": tf.__version__,
            "tensorflow_privacy": _tfp_version(),
            "python": platform.python_version(),
        },
        "settings": {
            "mode": "quick" if args.quick else "full",
            "warmup": budget.warmup,
            "steps": budget.steps,
            "min_steps": budget.min_steps,
            "seconds_per_variant": budget.seconds,
            "learning_rate": LEARNING_RATE,
            "l2_norm_clip": DP.l2_norm_clip,
            "noise_multiplier": DP.noise_multiplier,
        },
        "rows": rows,
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
