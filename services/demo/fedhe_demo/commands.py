"""Contributes ``fedhe demo`` to the command line."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from client_agent.quiet_tensorflow import import_tensorflow
from fedhe.logs import configure_logging


def _run(args: argparse.Namespace) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter hides the table
    import_tensorflow()
    from fedhe.job_options import Algorithm
    from fedhe_demo.demo import DemoOptions, run_demo

    configure_logging("WARNING", "demo", json_lines=False)
    run_demo(
        DemoOptions(
            dataset=args.dataset,
            model=args.model,
            algorithm=Algorithm(args.algorithm),
            sample_fraction=args.sample_fraction,
            rounds=args.rounds,
            num_sites=args.sites,
            alpha=args.alpha,
            seed=args.seed,
            workdir=Path(args.workdir) if args.workdir else None,
            report=Path(args.report) if args.report else None,
            noise_multiplier=args.noise_multiplier,
            local_epochs=args.local_epochs,
        )
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``fedhe demo``."""
    demo = sub.add_parser("demo", help="run a whole federation on this machine and report accuracy")
    demo.add_argument("--dataset", default="breast_cancer", choices=["breast_cancer", "digits"])
    demo.add_argument("--model", choices=["logistic", "mlp", "cnn"], help="default: the dataset's preset (cnn: digits)")
    demo.add_argument("--algorithm", choices=["fedavg", "fedprox"], default="fedavg")
    demo.add_argument("--sample-fraction", type=float, help="ask a random fraction of the sites each round")
    demo.add_argument("--rounds", type=int, help="training rounds (default: the preset's)")
    demo.add_argument("--sites", type=int, default=3)
    demo.add_argument("--alpha", type=float, default=1.0, help="Dirichlet non-IID concentration")
    demo.add_argument("--noise-multiplier", type=float, default=None, help="DP-SGD noise (default: the preset's)")
    demo.add_argument("--local-epochs", type=int, default=None, help="local epochs per round (default: the preset's)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--workdir")
    demo.add_argument("--report", help="write the report as JSON here")
    demo.set_defaults(func=_run)
