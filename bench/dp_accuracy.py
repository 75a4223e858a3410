"""Accuracy of federated training with and without DP: IID and non-IID sites, FedAvg and FedProx.

Each row is one in-process federation (``client_agent.simulation``: the agent's own DP-SGD,
sample-weighted plaintext averaging) scored on a held-out test set, next to the centralised
non-private baseline (the same model trained with Adam on the pooled training data). ε is
per site at δ = 1e-5 (PLD), as each site's ledger would show after the job; the smallest site
spends the most. Settings are the ones ``tests/unit/test_federated_accuracy.py`` asserts on.

    FEDHE_INSECURE_DP_SEED=test-only:1 python -m bench.dp_accuracy --out bench/results

The seed switch makes the DP rows reproducible; without it every run draws fresh noise.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf

from client_agent.datasets import digits_as_images, load_bundled, partition_dirichlet, partition_iid, split
from client_agent.dp_randomness import SWITCH
from client_agent.evaluation import evaluate
from client_agent.models import initial_weights
from client_agent.simulation import FederatedSettings, centralised_accuracy, run_federation, with_pooled_normalisation
from fedhe.modelspec import ModelSpec
from fedhe.privacy import DPSettings

FEDPROX_MU = 0.1


@dataclass(frozen=True)
class Case:
    """One dataset, its sites, model and DP settings."""

    dataset: str
    sites: int
    alpha: float
    spec: ModelSpec
    settings: FederatedSettings
    baseline_epochs: int
    min_site_rows: int
    images: bool = False  # digits as 8x8 images, for the CNN
    baseline_learning_rate: float = 0.01


CASES = (
    Case(
        "breast_cancer",
        3,
        1.0,
        ModelSpec(architecture="logistic", input_shape=(30,), num_classes=2),
        FederatedSettings(
            rounds=3, local_epochs=2, batch_size=32, learning_rate=1.0, dp=DPSettings(noise_multiplier=2.5)
        ),
        100,
        80,
    ),
    Case(
        "digits",
        5,
        1.0,
        ModelSpec(architecture="logistic", input_shape=(64,), num_classes=10),
        FederatedSettings(
            rounds=5,
            local_epochs=3,
            batch_size=96,
            learning_rate=0.5,
            local_momentum=0.9,
            dp=DPSettings(noise_multiplier=1.0),
        ),
        60,
        96,
    ),
    # The same at ε ≈ 3 per site, to show what that budget buys on sites of ~290 rows.
    Case(
        "digits",
        5,
        1.0,
        ModelSpec(architecture="logistic", input_shape=(64,), num_classes=10),
        FederatedSettings(
            rounds=5,
            local_epochs=3,
            batch_size=96,
            learning_rate=0.5,
            local_momentum=0.9,
            dp=DPSettings(noise_multiplier=3.3),
        ),
        60,
        96,
    ),
    # The small CNN on digits as images at ε ≈ 16 per site (FedAvg comes within 10 points).
    Case(
        "digits",
        5,
        1.0,
        ModelSpec(architecture="cnn", input_shape=(8, 8, 1), conv_filters=[8, 16], activation="tanh", num_classes=10),
        FederatedSettings(
            rounds=5,
            local_epochs=3,
            batch_size=96,
            learning_rate=1.0,
            local_momentum=0.9,
            dp=DPSettings(noise_multiplier=1.0),
        ),
        30,
        96,
        images=True,
        baseline_learning_rate=0.003,
    ),
)


def _rows(case: Case) -> list[dict[str, Any]]:
    pool, test = split(digits_as_images() if case.images else load_bundled(case.dataset), 0.2, seed=0)
    partitions = {
        "IID": partition_iid(len(pool), case.sites, seed=0),
        f"Dirichlet α={case.alpha}": partition_dirichlet(
            pool.y, case.sites, case.alpha, seed=0, min_size=case.min_site_rows
        ),
    }
    rows = []
    for partition, parts in partitions.items():
        sites = [pool.subset(rows) for rows in parts]
        spec = with_pooled_normalisation(case.spec, sites)
        baseline = centralised_accuracy(
            spec, pool, test, epochs=case.baseline_epochs, learning_rate=case.baseline_learning_rate
        )
        for algorithm, mu in (("FedAvg", 0.0), ("FedProx μ=0.1", FEDPROX_MU)):
            for private in (False, True):
                settings = replace(case.settings, proximal_mu=mu, dp=case.settings.dp if private else None)
                print(f"dp_accuracy: {case.dataset} {partition} {algorithm} DP={private} ...", flush=True)
                run = run_federation(spec, sites, settings, initial_weights(spec, 0))
                rows.append(
                    {
                        "dataset": f"{case.dataset} (images)" if case.images else case.dataset,
                        "model": case.spec.architecture,
                        "sites": [len(s) for s in sites],
                        "partition": partition,
                        "algorithm": algorithm,
                        "dp": private,
                        "accuracy": evaluate(spec, run.weights, test)["accuracy"],
                        "baseline": baseline,
                        "epsilons": run.epsilons,
                        "settings": {
                            "rounds": settings.rounds,
                            "local_epochs": settings.local_epochs,
                            "batch_size": settings.batch_size,
                            "learning_rate": settings.learning_rate,
                            "local_momentum": settings.local_momentum,
                            "noise_multiplier": case.settings.dp.noise_multiplier if case.settings.dp else None,
                            "l2_norm_clip": case.settings.dp.l2_norm_clip if case.settings.dp else None,
                        },
                    }
                )
    return rows


def _markdown(rows: list[dict[str, Any]], seconds: float) -> str:
    lines = [
        "# Federated accuracy with and without DP",
        "",
        "Held-out test accuracy (20% of the dataset); baseline: the same model, centralised, non-private (Adam). "
        "ε per site at δ = 1e-5 (PLD). "
        + (
            f"DP noise from {SWITCH}={os.environ[SWITCH]} (reproducible)."
            if SWITCH in os.environ
            else "Fresh DP noise from OS entropy (each run differs by a few points)."
        ),
        "",
        "| dataset | model | sites (rows) | partition | algorithm | DP | accuracy | baseline | ε per site | settings |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        eps = ", ".join(f"{e:.2f}" for e in row["epsilons"]) if row["dp"] else "∞ (no DP)"
        s = row["settings"]
        settings = f"R={s['rounds']}, E={s['local_epochs']}, B={s['batch_size']}, lr={s['learning_rate']}"
        if s["local_momentum"]:
            settings += f", momentum={s['local_momentum']}"
        if row["dp"]:
            settings += f", σ={s['noise_multiplier']}, C={s['l2_norm_clip']}"
        lines.append(
            f"| {row['dataset']} | {row['model']} | {', '.join(map(str, row['sites']))} | {row['partition']} | "
            f"{row['algorithm']} | "
            f"{'yes' if row['dp'] else 'no'} | {row['accuracy']:.3f} | {row['baseline']:.3f} | {eps} | {settings} |"
        )
    lines += ["", f"Total {seconds:.0f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    tf.get_logger().setLevel("ERROR")
    started = time.perf_counter()
    rows = [row for case in CASES for row in _rows(case)]
    seconds = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dp_accuracy.json").write_text(json.dumps({"rows": rows, "seconds": seconds}, indent=2) + "\n")
    (args.out / "dp_accuracy.md").write_text(_markdown(rows, seconds))
    print(f"dp_accuracy: wrote {args.out / 'dp_accuracy.md'} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
