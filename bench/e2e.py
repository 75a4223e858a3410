"""End-to-end round overhead of encryption and secure aggregation: the demo federation as it runs
by default against the same federation in plaintext.

Runs ``fedhe demo`` (keyserver, aggregator, DP-SGD agents as processes) in three modes per case:
with fedhe's defaults (``bfv-packed-v1`` with secure aggregation: masks, signed statements,
three phases per round), with the same codec and no secure aggregation, and with the
benchmark-only plaintext format (no encryption, no secure aggregation). The modes run side by
side in one invocation, interleaved: each mode runs ``--repeats`` times (default 2), in the
order secure, encrypted, plaintext, then the reverse, and so on, so that a machine that slows
down or speeds up during the invocation weighs on every mode alike. Each run's first training
round (the agents' TensorFlow start-up) is left out; ``--rounds`` (default 10) is how many
training rounds of each mode are measured, split over its runs. The report gives the median of
every mode's measured rounds and the ratios of the medians, beside issue 10's target (a round
with encryption at most 1.1x the plaintext one at 1M parameters). Cases: a ~1M-parameter MLP
on the demo's breast-cancer data with 3 and 10 sites, and the demo's preset (logistic
regression) with 3 sites. A round's time includes the sites' DP-SGD training, as a
deployment's does.

    python -m bench.e2e --out bench/results          # every case, 10 measured rounds a mode, 2 runs each
    python -m bench.e2e --cases mlp3 --rounds 2 --out /tmp/e2e  # one case, a short run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.reporting import machine_description, markdown_table, write_markdown
from fedhe.he import DEFAULT_FORMAT_ID
from fedhe.he.codec import PLAINTEXT_FORMAT_ID
from fedhe.he.plaintext import SWITCH
from fedhe_demo.demo import DemoOptions, run_demo


@dataclass(frozen=True)
class Case:
    label: str
    model: str | None
    hidden_units: tuple[int, ...] | None
    sites: int
    million_params: bool
    """Whether the model is the ~1M-parameter one the target is stated for."""


CASES: dict[str, Case] = {
    "mlp3": Case("MLP 30-1000-1000-2 (~1.03M params), 3 sites", "mlp", (1000, 1000), 3, True),
    "mlp10": Case("MLP 30-1000-1000-2 (~1.03M params), 10 sites", "mlp", (1000, 1000), 10, True),
    "demo3": Case("demo preset (logistic, 62 params), 3 sites", None, None, 3, False),
}

MODES: dict[str, tuple[str, bool]] = {
    "secure": (DEFAULT_FORMAT_ID, True),
    "encrypted": (DEFAULT_FORMAT_ID, False),
    "plaintext": (PLAINTEXT_FORMAT_ID, False),
}
"""fedhe's default; the same codec without secure aggregation (what the protocol alone costs); no encryption."""

ALPHA = 10.0
"""Nearly IID splits: ten sites of breast cancer's 455 training rows each get enough of them."""

TARGET_RATIO = 1.1
"""Issue 10 (and 18): a round with encryption at most 1.1x the plaintext round at 1M parameters."""


def measured_round_seconds(report: dict[str, Any]) -> list[float]:
    """The training rounds' seconds after the first, which includes the agents' TensorFlow start-up
    (model building, tracing); the statistics round is not a training round."""
    training = [r for r in report["per_round"] if r["kind"] == "training" and r["round_seconds"] is not None]
    return [float(r["round_seconds"]) for r in training[1:]]


def run_order(repeats: int) -> list[str]:
    """The modes' runs, interleaved: secure, encrypted, plaintext, then the reverse, and so on."""
    order: list[str] = []
    for repeat in range(repeats):
        order += list(MODES) if repeat % 2 == 0 else list(reversed(MODES))
    return order


def rounds_per_run(measured: int, repeats: int) -> int:
    """Training rounds of each run so that ``repeats`` runs measure at least ``measured`` rounds."""
    return -(-measured // repeats) + 1


def run_case(case: Case, rounds: int, repeats: int) -> dict[str, Any]:
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    upload_bytes: dict[str, int] = {}
    runs = []
    for mode in run_order(repeats):
        format_id, secure = MODES[mode]
        options = DemoOptions(
            rounds=rounds,
            format_id=format_id,
            secure_aggregation=secure,
            model=case.model,
            hidden_units=case.hidden_units,
            local_epochs=1,
            num_sites=case.sites,
            alpha=ALPHA,
        )
        started = time.perf_counter()
        report = run_demo(options)
        measured = measured_round_seconds(report)
        seconds[mode] += measured
        upload_bytes[mode] = round(report["per_round"][-1]["bytes_uploaded"] / report["num_sites"])
        runs.append({"mode": mode, "wall_s": time.perf_counter() - started, "round_seconds": measured})
        print(json.dumps({"case": case.label, **runs[-1]}), flush=True)
    median = {mode: statistics.median(values) for mode, values in seconds.items()}
    return {
        "case": case.label,
        "sites": case.sites,
        "measured_rounds": min(len(values) for values in seconds.values()),
        "secure_median_s": median["secure"],
        "encrypted_median_s": median["encrypted"],
        "plaintext_median_s": median["plaintext"],
        "secure_over_plaintext": median["secure"] / median["plaintext"],
        "encrypted_over_plaintext": median["encrypted"] / median["plaintext"],
        "secure_over_encrypted": median["secure"] / median["encrypted"],
        "secure_upload_bytes": upload_bytes["secure"],
        "encrypted_upload_bytes": upload_bytes["encrypted"],
        "plaintext_upload_bytes": upload_bytes["plaintext"],
        "million_params": case.million_params,
        "round_seconds": seconds,
        "runs": runs,
    }


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each case's ratios beside the target."""
    lines = []
    for row in rows:
        for mode in ("encrypted", "secure"):
            ratio = row[f"{mode}_over_plaintext"]
            lines.append(
                {
                    "target": f"round time <= {TARGET_RATIO}x plaintext at 1M parameters",
                    "case": row["case"],
                    "mode": mode,
                    "measured": f"{ratio:.2f}x ({row[f'{mode}_median_s']:.3g} s against "
                    f"{row['plaintext_median_s']:.3g} s, medians of {row['measured_rounds']} rounds)",
                    "met": ("yes" if ratio <= TARGET_RATIO else "no")
                    if row["million_params"]
                    else "n/a (the target is at 1M parameters)",
                }
            )
    return lines


COLUMNS = [
    "case",
    "measured_rounds",
    "secure_median_s",
    "encrypted_median_s",
    "plaintext_median_s",
    "secure_over_plaintext",
    "encrypted_over_plaintext",
    "secure_over_encrypted",
    "secure_upload_bytes",
    "encrypted_upload_bytes",
    "plaintext_upload_bytes",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument(
        "--rounds",
        type=int,
        default=10,
        help="training rounds measured per mode, split over its runs; each run adds one unmeasured (default 10)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs of each mode, interleaved (default 2)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        parser.error("--rounds and --repeats must be at least 1")
    per_run = rounds_per_run(args.rounds, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ[SWITCH] = "benchmark-only"  # inherited by the aggregator and agents of this run only
    rows = []
    for name in args.cases:
        rows.append(run_case(CASES[name], per_run, args.repeats))
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("round_seconds", "runs")}), flush=True)
    command = f"python -m bench.e2e --cases {' '.join(args.cases)} --rounds {args.rounds} --repeats {args.repeats}"
    machine = machine_description()
    result = {
        "machine": machine,
        "command": command,
        "rounds_per_run": per_run,
        "repeats": args.repeats,
        "rows": rows,
    }
    (args.out / "e2e.json").write_text(json.dumps(result, indent=2))
    order = ", ".join(run_order(args.repeats))
    write_markdown(
        args.out / "e2e.md",
        "End-to-end round time: encrypted with secure aggregation vs plaintext",
        machine,
        [
            markdown_table(targets(rows), ["target", "case", "mode", "measured", "met"]),
            markdown_table(rows, COLUMNS),
            [
                f"Medians of the training rounds after each run's first (which includes TensorFlow start-up); "
                f"{per_run} training rounds a run, {args.repeats} run(s) of each mode in one invocation, in the "
                f"order {order}; the statistics round is not counted; 1 local epoch; Dirichlet alpha {ALPHA} "
                "splits.",
                "secure: the default, bfv-packed-v1 with secure aggregation (three phases a round); encrypted: "
                "bfv-packed-v1 without secure aggregation; plaintext: the benchmark-only format, no encryption and "
                "no secure aggregation. Ratios are of the medians; upload bytes are per site and round.",
                f"Command: {command}",
            ],
        ],
    )


if __name__ == "__main__":
    main()
