"""HE aggregation benchmark: bytes, time, memory and error of each codec, side by side.

For each model size, every codec encrypts the same updates; an aggregator child process sums
them for 3, 10, 50 and 200 sites (cycling a pool of distinct encrypted updates: the work and
memory of an addition do not depend on the values); a site decrypts. Ratios are taken within
this one run, so machine noise affects every row alike. The packed codec is summed chunk index
by chunk index, in one process or in two (``agg_procs``), and encrypted by one process or two.

    python -m bench.he_bench --out bench/results [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.he_codecs import (
    MAX_SAMPLES,
    MAX_WEIGHT,
    PACKED_SETTINGS,
    BenchCodec,
    PackedCodec,
    PlainFloat32,
    SeededCodec,
    TenSEALBaseline,
)
from bench.reporting import machine_description, write_markdown_table
from fedhe.global_model import weighted_update
from fedhe.he import Envelope, PackingSettings, encode_envelope

POOL = 3
# The TenSEAL baseline at 10M parameters is ~810 MB per update and minutes per aggregation;
# it is measured for 3 sites only there, and the other rows say so.
BASELINE_MAX_SITES_AT_10M = 3


def _updates(size: int, seed: int) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    return [(rng.uniform(-MAX_WEIGHT, MAX_WEIGHT, size), int(rng.integers(100, MAX_SAMPLES))) for _ in range(POOL)]


def _read_sum(path: Path) -> list[bytes]:
    data = path.read_bytes()
    chunks, offset = [], 0
    while offset < len(data):
        (size,) = struct.unpack_from(">Q", data, offset)
        chunks.append(data[offset + 8 : offset + 8 + size])
        offset += 8 + size
    return chunks


def _aggregate(kind: str, workdir: Path, sites: int, size: int, procs: int) -> dict[str, Any]:
    output = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.he_aggregate_worker",
            "--kind",
            kind,
            "--dir",
            str(workdir),
            "--sites",
            str(sites),
            "--num-values",
            str(size),
            "--procs",
            str(procs),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(output.stdout.strip().splitlines()[-1])


def bench_codec(
    codec: BenchCodec, kind: str, size: int, site_counts: list[int], workdir: Path, procs: int = 1
) -> list[dict[str, Any]]:
    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.glob("*"):
        old.unlink()
    pool = _updates(size, seed=size)
    scale = codec.weight_scale
    scaled = [weighted_update(w, np.zeros_like(w), n, scale) if kind != "plain" else w * n / scale for w, n in pool]
    if procs > 1:
        codec.encrypt(scaled[0][: 8 * 8192 * procs])  # start the worker pool outside the timing
    started, cpu = time.perf_counter(), time.process_time()
    first = codec.encrypt(scaled[0])
    encrypt_s, encrypt_cpu_s = time.perf_counter() - started, time.process_time() - cpu
    update_bytes = sum(len(c) for c in first)
    for index, values in enumerate(scaled):
        chunks = first if index == 0 else codec.encrypt(values)
        envelope = Envelope(format_id=kind, key_id="bench", num_values=size, chunks=chunks)
        (workdir / f"update-{index}.fedhe").write_bytes(encode_envelope(envelope))
    (workdir / "aggregator-context.bin").write_bytes(codec.aggregator_context())
    (workdir / "packing-settings.json").write_text(codec.aggregator_settings())
    rows = []
    for sites in site_counts:
        if kind == "tenseal" and size >= 10_000_000 and sites > BASELINE_MAX_SITES_AT_10M:
            rows.append({"codec": codec.name, "params": size, "sites": sites, "skipped": "baseline too slow at 10M"})
            continue
        aggregated = _aggregate(kind, workdir, sites, size, procs)
        summed = _read_sum(workdir / "sum.fedhe")
        started = time.perf_counter()
        decrypted = codec.decrypt(summed, size)
        decrypt_s = time.perf_counter() - started
        samples = [pool[k % POOL][1] for k in range(sites)]
        expected = sum(pool[k % POOL][0] * pool[k % POOL][1] for k in range(sites)) / sum(samples)
        average = decrypted * scale / sum(samples)
        rows.append(
            {
                "codec": codec.name,
                "params": size,
                "sites": sites,
                "agg_procs": procs,
                "encrypt_s": encrypt_s,
                "encrypt_params_per_s": size / encrypt_s,
                # CPU time of this process: the one-core rate, whatever else shares the machine
                # (with a worker pool the work is elsewhere, so it is left out).
                "encrypt_cpu_params_per_s": size / encrypt_cpu_s if procs == 1 else None,
                "bytes_per_param": update_bytes / size,
                "aggregate_s": aggregated["seconds"],
                "aggregate_cpu_s": aggregated["cpu_seconds"],
                "aggregator_peak_mib": aggregated["peak_kib_above_baseline"] / 1024,
                "peak_vs_one_update": aggregated["peak_kib_above_baseline"] * 1024 / update_bytes,
                "decrypt_s": decrypt_s,
                "max_abs_error": float(np.max(np.abs(average - expected))),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def parallel_encryption(codec: SeededCodec, size: int) -> dict[str, Any]:
    """Encryption with a warm pool of worker processes (aggregation is the same as 1 process)."""
    change = np.random.default_rng(size).uniform(-10, 10, size)
    values = weighted_update(change, np.zeros(size), 1000, codec.weight_scale)
    codec.encrypt(values[: min(size, 4096 * 16)])
    started = time.perf_counter()
    chunks = codec.encrypt(values)
    seconds = time.perf_counter() - started
    row = {
        "codec": codec.name,
        "params": size,
        "sites": "-",
        "encrypt_s": seconds,
        "encrypt_params_per_s": size / seconds,
        "bytes_per_param": sum(len(c) for c in chunks) / size,
    }
    print(json.dumps(row), flush=True)
    return row


def accuracy_at_100_sites(codec: SeededCodec, size: int = 20_000) -> dict[str, Any]:
    """The issue's accuracy target: |w| up to 10, 100 distinct sites, error of the average."""
    from fedhe.he import CKKS_FORMAT_ID, codec_for, load_evaluation_context

    rng = np.random.default_rng(100)
    aggregator = codec_for(CKKS_FORMAT_ID, load_evaluation_context(codec.aggregator_context()))
    total = np.zeros(size)
    samples = 0
    updates = []
    for _ in range(100):
        weights, n = rng.uniform(-10, 10, size), int(rng.integers(1, 1000))
        updates.append(codec.encrypt(weighted_update(weights, np.zeros(size), n, codec.weight_scale)))
        total += weights * n
        samples += n
    average = codec.decrypt(aggregator.sum_updates(updates, size), size) * codec.weight_scale / samples
    return {"sites": 100, "params": size, "max_abs_error": float(np.max(np.abs(average - total / samples)))}


def packed_accuracy_at_100_sites(size: int = 100_000) -> dict[str, Any]:
    """Issue 10's target for the packed codec: 100 sites, changes within ±R, S the bound on each
    n_k (ADR 0006), 16 bits with headroom for 128 sites; error of the weighted mean over R."""
    from fedhe.he import PACKED_FORMAT_ID, codec_for, load_evaluation_context

    settings = PackingSettings(clip_range=0.5, bits=16, max_sites=128)
    codec = PackedCodec(1, settings)
    aggregator = codec_for(PACKED_FORMAT_ID, load_evaluation_context(codec.aggregator_context()), options=settings)
    rng = np.random.default_rng(101)
    bound = 1000
    total, samples = np.zeros(size), 0
    updates = []
    for _ in range(100):
        change, n = rng.uniform(-settings.clip_range, settings.clip_range, size), int(rng.integers(500, bound + 1))
        updates.append(codec.encrypt(change * n / bound))
        total += change * n
        samples += n
    average = codec.decrypt(aggregator.sum_updates(updates, size), size) * bound / samples
    error = float(np.max(np.abs(average - total / samples)))
    return {"sites": 100, "params": size, "max_abs_error": error, "error_over_r": error / settings.clip_range}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--quick", action="store_true", help="100k and 1M parameters, 3 and 10 sites")
    args = parser.parse_args(argv)
    sizes = [100_000, 1_000_000] if args.quick else [100_000, 1_000_000, 10_000_000]
    site_counts = [3, 10] if args.quick else [3, 10, 50, 200]
    args.out.mkdir(parents=True, exist_ok=True)
    workers = os.cpu_count() or 1
    ours, ours_parallel = SeededCodec(1), SeededCodec(workers)
    packed, packed_parallel = PackedCodec(1), PackedCodec(workers)
    codecs: list[tuple[BenchCodec, str, int]] = [
        (PlainFloat32(), "plain", 1),
        (TenSEALBaseline(), "tenseal", 1),
        (ours, "seeded", 1),
        (packed, "packed", 1),
    ]
    if workers > 1:
        codecs.append((packed_parallel, "packed", workers))
    rows: list[dict[str, Any]] = []
    scratch = args.out / "scratch"
    for size in sizes:
        for codec, kind, procs in codecs:
            rows += bench_codec(codec, kind, size, site_counts, scratch, procs)
        if workers > 1:
            rows.append(parallel_encryption(ours_parallel, size))
    accuracy = accuracy_at_100_sites(ours)
    packed_accuracy = packed_accuracy_at_100_sites()
    for closing in (ours, ours_parallel, packed, packed_parallel):
        closing.close()
    for old in scratch.glob("*"):
        old.unlink()
    scratch.rmdir()
    result = {
        "machine": machine_description(),
        "python": platform.python_version(),
        "rows": rows,
        "accuracy_100_sites": accuracy,
        "packed_accuracy_100_sites": packed_accuracy,
    }
    (args.out / "he_bench.json").write_text(json.dumps(result, indent=2))
    columns = [
        "codec",
        "params",
        "sites",
        "agg_procs",
        "bytes_per_param",
        "encrypt_s",
        "encrypt_params_per_s",
        "encrypt_cpu_params_per_s",
        "aggregate_s",
        "aggregate_cpu_s",
        "aggregator_peak_mib",
        "peak_vs_one_update",
        "decrypt_s",
        "max_abs_error",
    ]
    write_markdown_table(
        args.out / "he_bench.md",
        "HE aggregation benchmark",
        result["machine"],
        rows,
        columns,
        notes=[
            f"accuracy with 100 sites, |w| <= 10: max abs error {accuracy['max_abs_error']:.2e}",
            f"packed rows: R = {PACKED_SETTINGS.clip_range:g}, {PACKED_SETTINGS.bits} bits, "
            f"max_sites {PACKED_SETTINGS.max_sites}, S = {MAX_SAMPLES} (the largest n_k drawn)",
            f"packed, 100 sites, changes within ±R, 16 bits, max_sites 128: max error of the weighted mean "
            f"{packed_accuracy['error_over_r']:.2e} x R",
        ],
    )
    _plot(rows, args.out / "he_bench.png")
    print(f"wrote {args.out}/he_bench.md, .json and .png")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if "skipped" not in r and isinstance(r["sites"], int)]
    codecs = list(dict.fromkeys(r["codec"] for r in measured))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for codec in codecs:
        mine = [r for r in measured if r["codec"] == codec]
        one_site_count = [r for r in mine if r["sites"] == min(x["sites"] for x in mine)]
        axes[0].plot(
            [r["params"] for r in one_site_count], [r["bytes_per_param"] for r in one_site_count], "o-", label=codec
        )
        axes[1].plot([r["params"] for r in one_site_count], [r["encrypt_s"] for r in one_site_count], "o-", label=codec)
        largest = max(r["params"] for r in mine)
        at_largest = [r for r in mine if r["params"] == largest]
        axes[2].plot(
            [r["sites"] for r in at_largest],
            [r["aggregate_s"] for r in at_largest],
            "o-",
            label=f"{codec} ({largest:,} params)",
        )
    axes[0].set(xscale="log", yscale="log", xlabel="parameters", ylabel="bytes per parameter", title="Wire size")
    axes[1].set(xscale="log", yscale="log", xlabel="parameters", ylabel="seconds", title="Site encrypt + serialise")
    axes[2].set(xlabel="sites", ylabel="seconds", title="Aggregator: add all updates")
    for axis in axes:
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
