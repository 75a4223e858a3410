"""End-to-end round overhead of encryption and secure aggregation: the demo federation as it runs
by default against the same federation in plaintext.

Runs ``fedhe demo`` (keyserver, aggregator, DP-SGD agents as processes) three times per case:
with fedhe's defaults (``bfv-packed-v1`` with secure aggregation: masks, signed statements,
three phases per round), with the same codec and no secure aggregation, and with the
benchmark-only plaintext format (no encryption, no secure aggregation); it reports the mean
round time of each and their ratios. Cases: the demo's breast-cancer preset (logistic
regression) with 3 sites, and a ~1M-parameter MLP on the same data with 3 and 10 sites. A
round's time includes the sites' DP-SGD training, as a deployment's does.

    python -m bench.e2e --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

from bench.reporting import machine_description, write_markdown_table
from fedhe.he import DEFAULT_FORMAT_ID
from fedhe.he.codec import PLAINTEXT_FORMAT_ID
from fedhe.he.plaintext import SWITCH
from fedhe_demo.demo import DemoOptions, run_demo

CASES: dict[str, tuple[str | None, tuple[int, ...] | None, int]] = {
    "demo preset (logistic, 62 params), 3 sites": (None, None, 3),
    "MLP 30-1000-1000-2 (~1.03M params), 3 sites": ("mlp", (1000, 1000), 3),
    "MLP 30-1000-1000-2 (~1.03M params), 10 sites": ("mlp", (1000, 1000), 10),
}


MODES: dict[str, tuple[str, bool]] = {
    "secure": (DEFAULT_FORMAT_ID, True),
    "encrypted": (DEFAULT_FORMAT_ID, False),
    "plaintext": (PLAINTEXT_FORMAT_ID, False),
}
"""fedhe's default; the same codec without secure aggregation (what the protocol alone costs); no encryption."""

ALPHA = 10.0
"""Nearly IID splits: ten sites of breast cancer's 455 training rows each get enough of them."""


def _mean_round_seconds(report: dict[str, Any]) -> float:
    # The first training round includes the agents' TensorFlow start-up (model building, tracing);
    # the training rounds after it are the steady state.
    training = [r for r in report["per_round"] if r["kind"] == "training" and r["round_seconds"] is not None]
    return statistics.mean(float(r["round_seconds"]) for r in training[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ[SWITCH] = "benchmark-only"  # inherited by the aggregator and agents of this run only
    rows = []
    for name, (model, hidden, sites) in CASES.items():
        timings = {}
        for label, (format_id, secure) in MODES.items():
            options = DemoOptions(
                rounds=args.rounds,
                format_id=format_id,
                secure_aggregation=secure,
                model=model,
                hidden_units=hidden,
                local_epochs=1,
                num_sites=sites,
                alpha=ALPHA,
            )
            report = run_demo(options)
            per_site_bytes = report["per_round"][-1]["bytes_uploaded"] / report["num_sites"]
            timings[label] = (_mean_round_seconds(report), per_site_bytes)
        rows.append(
            {
                "case": name,
                "secure_round_s": timings["secure"][0],
                "encrypted_round_s": timings["encrypted"][0],
                "plaintext_round_s": timings["plaintext"][0],
                "ratio": timings["secure"][0] / timings["plaintext"][0],
                "secure_vs_encrypted": timings["secure"][0] / timings["encrypted"][0],
                "secure_upload_bytes": timings["secure"][1],
                "plaintext_upload_bytes": timings["plaintext"][1],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    result = {"machine": machine_description(), "rounds": args.rounds, "rows": rows}
    (args.out / "e2e.json").write_text(json.dumps(result, indent=2))
    write_markdown_table(
        args.out / "e2e.md",
        "End-to-end round time: encrypted with secure aggregation vs plaintext",
        result["machine"],
        rows,
        list(rows[0]),
        notes=[
            "Mean of the training rounds after the first (which includes TensorFlow start-up); the statistics "
            f"round is not counted; Dirichlet alpha {ALPHA} splits.",
            "secure: the default, bfv-packed-v1 with secure aggregation (three phases a round); encrypted: "
            "bfv-packed-v1 without secure aggregation; plaintext: the benchmark-only format, no encryption and "
            "no secure aggregation. ratio: secure over plaintext.",
        ],
    )


if __name__ == "__main__":
    main()
