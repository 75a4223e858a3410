"""Run every benchmark: ``make bench`` (add ``BENCH_ARGS=--quick`` for a shorter run).

Writes markdown tables, JSON files and a plot under ``bench/results/`` and, after a full run,
copies the tables into docs/performance.md (``bench.publish``). Benchmarks are not tests: they
report measured ratios side by side and assert nothing about speed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import dp_accuracy, dp_speed, e2e, he_bench, load, precision, publish, secagg, transfer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    out = ["--out", str(args.out)]
    quick = ["--quick"] if args.quick else []
    he_bench.main(out + quick)
    precision.main(out + quick)
    secagg.main(out + quick)
    load.main(out + (["--sites", "10", "--rounds", "2", "--params", "20000"] if args.quick else []))
    dp_speed.main(out + quick)
    e2e.main(out + (["--rounds", "2", "--repeats", "1"] if args.quick else []))
    transfer.main(out + quick)
    if not args.quick:
        dp_accuracy.main(out)
        publish.main(["--results", str(args.out)])


if __name__ == "__main__":
    main()
