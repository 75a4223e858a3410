"""``fedhe demo``: a whole federation on one machine, trained to a reported accuracy.

Keyserver, aggregator and one agent per site run as separate processes on loopback, with
SQLite and no Redis. A bundled scikit-learn dataset is split into a held-out test set and a
training pool; the pool is spread non-IID (Dirichlet) over the sites. After the job, the
final federated model (as a site exported it) and a centralised, non-private baseline trained
on the pooled training data are scored on the same held-out test set.

The input scaling (mean/std per feature) is computed from the pooled training data and put in
the job's model spec as public preprocessing: a demo convenience. Real federations agree on
scaling from public knowledge or a separate private protocol.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.live import Live

from fedhe.cli.watch import follow, render
from fedhe.datasets import Dataset, load_bundled, partition_dirichlet, save_csv, split
from fedhe.he import DEFAULT_FORMAT_ID
from fedhe.local_cluster import (
    ClusterSecrets,
    ManagedProcess,
    free_port,
    provision_site,
    start_agent,
    start_aggregator,
    start_keyserver,
    url,
)
from fedhe.modelspec import InputNormalisation, ModelSpec
from fedhe.privacy import DPSettings
from fedhe.schemas import FederationCreate, JobCreate, JobPublic, JobStatus, RoundPublic, RoundState


@dataclass(frozen=True)
class DemoOptions:
    """What ``fedhe demo`` runs."""

    dataset: str = "breast_cancer"
    rounds: int = 5
    num_sites: int = 3
    alpha: float = 0.5
    seed: int = 0
    workdir: Path | None = None
    report: Path | None = None
    noise_multiplier: float | None = None
    timeout_s: float = 900
    format_id: str = DEFAULT_FORMAT_ID
    hidden_units: tuple[int, ...] | None = None
    local_epochs: int | None = None


_PRESETS: dict[str, dict[str, Any]] = {
    "breast_cancer": {
        "hidden_units": [16],
        "local_epochs": 2,
        "batch_size": 16,
        "learning_rate": 0.2,
        "noise_multiplier": 1.2,
        "baseline_epochs": 60,
    },
    "digits": {
        "hidden_units": [32],
        "local_epochs": 2,
        "batch_size": 32,
        "learning_rate": 0.2,
        "noise_multiplier": 1.0,
        "baseline_epochs": 60,
    },
}


def _job_request(options: DemoOptions, key_id: str, train: Dataset) -> JobCreate:
    preset = _PRESETS[options.dataset]
    mean = train.x.mean(axis=0)
    std = np.where(train.x.std(axis=0) > 0, train.x.std(axis=0), 1.0)
    model = ModelSpec(
        input_shape=(train.x.shape[1],),
        hidden_units=list(options.hidden_units) if options.hidden_units is not None else preset["hidden_units"],
        num_classes=int(train.y.max()) + 1,
        normalisation=InputNormalisation(mean=mean.tolist(), std=std.tolist()),
    )
    noise = options.noise_multiplier if options.noise_multiplier is not None else preset["noise_multiplier"]
    return JobCreate(
        name=f"demo-{options.dataset}",
        key_id=key_id,
        model=model,
        rounds=options.rounds,
        min_sites=options.num_sites,
        round_deadline_s=300,
        local_epochs=options.local_epochs or preset["local_epochs"],
        batch_size=preset["batch_size"],
        learning_rate=preset["learning_rate"],
        dp=DPSettings(l2_norm_clip=1.0, noise_multiplier=noise, delta=1e-5),
        max_samples_per_round=10_000,
        seed=options.seed,
        format_id=options.format_id,
    )


def _baseline_accuracy(spec: ModelSpec, train: Dataset, test: Dataset, epochs: int, seed: int) -> float:
    """Centralised, non-private training of the same architecture on the pooled data."""
    import tensorflow as tf

    from fedhe.models import build_model

    tf.keras.utils.set_random_seed(seed)
    model = build_model(spec)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(0.01), loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.fit(train.x, train.y, epochs=epochs, batch_size=32, verbose=0)
    predicted = model(test.x, training=False).numpy().argmax(axis=1)
    return float((predicted == test.y).mean())


def _round_row(round_: RoundPublic) -> dict[str, Any]:
    evaluations = round_.evaluations
    examples = sum(e.num_examples for e in evaluations)
    accuracy = sum(e.metrics["accuracy"] * e.num_examples for e in evaluations) / examples if examples else None
    seconds = (round_.published_at - round_.opened_at).total_seconds() if round_.published_at else None
    return {
        "round": round_.number,
        "attempt": round_.attempt,
        "state": round_.state.value,
        "global_accuracy": accuracy,
        "site_epsilon": {s.site_id: s.metrics.get("epsilon") for s in round_.submissions},
        "bytes_uploaded": sum(s.num_bytes for s in round_.submissions),
        "round_seconds": seconds,
    }


def _print_report(report: dict[str, Any], site_names: dict[str, str]) -> None:
    print(
        f"\nfedhe demo: {report['dataset']}, {report['num_sites']} sites (Dirichlet alpha={report['alpha']}), "
        f"{report['rounds']} rounds, DP-SGD noise {report['noise_multiplier']}, delta {report['delta']}"
    )
    names = list(site_names.values())
    print(
        f"{'round':>5} {'global acc':>10} "
        + " ".join(f"{'eps ' + n:>12}" for n in names)
        + f" {'bytes up':>10} {'time s':>7}"
    )
    for row in report["per_round"]:
        eps = [row["site_epsilon"].get(site_id) for site_id in site_names]
        acc = "-" if row["global_accuracy"] is None else f"{row['global_accuracy']:.3f}"
        secs = "-" if row["round_seconds"] is None else f"{row['round_seconds']:.1f}"
        print(
            f"{row['round']:>5} {acc:>10} "
            + " ".join(f"{e:>12.2f}" if e is not None else f"{'-':>12}" for e in eps)
            + f" {row['bytes_uploaded']:>10} {secs:>7}"
        )
    print(
        f"\nfinal federated accuracy (held-out test set, {report['test_rows']} rows): "
        f"{report['federated_accuracy']:.3f}"
    )
    print(f"centralised non-private baseline (same model, pooled data):   {report['baseline_accuracy']:.3f}")
    print(f"privacy spent per site: max epsilon {report['max_epsilon']:.2f} at delta {report['delta']}")
    print(f"total wall time {report['wall_seconds']:.0f} s; logs and site files in {report['workdir']}")


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Run the federation, print the table and return (and optionally write) the report."""
    started = time.perf_counter()
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="fedhe-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    secrets = ClusterSecrets.generate(workdir / "secrets")
    ks_port, ag_port = free_port(), free_port()
    ks_url, ag_url = url(ks_port), url(ag_port)
    processes: list[ManagedProcess] = []
    try:
        print(f"starting keyserver ({ks_url}) and aggregator ({ag_url}); workdir {workdir}", flush=True)
        processes.append(
            start_keyserver(
                port=ks_port, database_url=f"sqlite:///{workdir}/keyserver.db", secrets=secrets, log_dir=logs
            )
        )
        processes.append(
            start_aggregator(
                port=ag_port,
                database_url=f"sqlite:///{workdir}/aggregator.db",
                keyserver_url=ks_url,
                secrets=secrets,
                log_dir=logs,
            )
        )
        data = load_bundled(options.dataset)
        pool, test = split(data, 0.2, seed=options.seed)
        parts = partition_dirichlet(
            pool.y,
            options.num_sites,
            options.alpha,
            seed=options.seed,
            min_size=4 * _PRESETS[options.dataset]["batch_size"],
        )
        with secrets.keyserver_admin(ks_url) as keyserver:
            federation = keyserver.create_federation(FederationCreate(name=f"demo-{options.dataset}"))
        request = _job_request(options, federation.key_id, pool)
        with secrets.aggregator_admin(ag_url) as aggregator:
            job = aggregator.create_job(request)
            site_names: dict[str, str] = {}
            for index, rows in enumerate(parts):
                name = f"site{index + 1}"
                site = provision_site(
                    aggregator_url=ag_url,
                    keyserver_url=ks_url,
                    secrets=secrets,
                    directory=workdir / "sites",
                    name=name,
                    federation_id=federation.id,
                )
                site_names[site.site_id] = name
                csv_path = workdir / "sites" / name / "data.csv"
                save_csv(pool.subset(rows), csv_path)
                counts = np.bincount(pool.y[rows], minlength=request.model.num_classes).tolist()
                print(f"{name}: {len(rows)} rows, class counts {counts}", flush=True)
                processes.append(
                    start_agent(
                        site=site,
                        name=name,
                        aggregator_url=ag_url,
                        keyserver_url=ks_url,
                        secrets=secrets,
                        data_path=csv_path,
                        state_dir=workdir / "sites" / name / "state",
                        job_id=job.id,
                        log_dir=logs,
                    )
                )
            agents = processes[2:]
            deadline = time.monotonic() + options.timeout_s

            def show(current: JobPublic, rounds: list[RoundPublic], names: dict[str, str]) -> None:
                live.update(render(current, rounds, names))
                for agent in agents:
                    if agent.process.poll() not in (None, 0):
                        raise RuntimeError(f"{agent.name} failed:\n{agent.tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError("demo timed out; see the logs in " + str(logs))

            with Live(console=Console(), refresh_per_second=4) as live:
                final = follow(aggregator, job.id, show)
            for agent in agents:
                agent.process.wait(timeout=max(1.0, deadline - time.monotonic()))
            if final.status != JobStatus.COMPLETED:
                raise RuntimeError(f"job ended {final.status.value}; see {logs}")
            rounds = [r for r in aggregator.rounds(job.id) if r.state == RoundState.PUBLISHED]
        first_site = next(iter(site_names.values()))
        final_weights = np.load(workdir / "sites" / first_site / "state" / f"{job.id}-final-weights.npy")
        from client_agent.evaluation import evaluate

        federated = evaluate(request.model, final_weights, test)
        baseline = _baseline_accuracy(
            request.model, pool, test, _PRESETS[options.dataset]["baseline_epochs"], options.seed
        )
        per_round = [_round_row(r) for r in rounds]
        epsilons = [e for row in per_round for e in row["site_epsilon"].values() if e is not None]
        report = {
            "dataset": options.dataset,
            "num_sites": options.num_sites,
            "alpha": options.alpha,
            "rounds": options.rounds,
            "noise_multiplier": request.dp.noise_multiplier,
            "delta": request.dp.delta,
            "job_id": job.id,
            "sites": site_names,
            "per_round": per_round,
            "test_rows": len(test),
            "federated_accuracy": federated["accuracy"],
            "federated_f1": federated["f1"],
            "baseline_accuracy": baseline,
            "max_epsilon": max(epsilons) if epsilons else 0.0,
            "wall_seconds": time.perf_counter() - started,
            "workdir": str(workdir),
        }
        _print_report(report, site_names)
        if options.report is not None:
            options.report.parent.mkdir(parents=True, exist_ok=True)
            options.report.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
            print(f"report written to {options.report}")
        return report
    finally:
        for process in reversed(processes):
            process.stop()
