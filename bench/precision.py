"""Precision on demand: bytes per parameter and error of the weighted mean for each ``bits`` setting.

For each setting of ``bfv-packed-v1`` (bits with the most sites the packing allows at that width),
10 sites encrypt their weighted changes with real TenSEAL/SEAL encryption, the aggregator sums
the ciphertexts as the service does, and the key holder decrypts the weighted mean. Two site
mixes: small sites (every n_k = S/100) and large ones (every n_k = S), S the public bound on n_k
(ADR 0006). A site divides by S before quantising, so small sites spend fewer levels on their
change and the mean divides the sum's rounding error by sum(n_k)/S: their error is the larger.

Errors are reported relative to R (the clip range) and to the change (the RMS of the true
weighted mean). The issue 18 target is an error of the weighted mean ≤ 1e-6 × R at ≤ 8 bytes
per parameter.

    python -m bench.precision [--params 1000000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.reporting import machine_description, write_markdown_table
from fedhe.he import (
    PACKED_FORMAT_ID,
    BfvParameters,
    PackingSettings,
    check_packing,
    codec_for,
    create_key_material,
    load_evaluation_context,
    load_secret_context,
)
from fedhe.he.packing import bytes_per_value, upload_bytes

CLIP_RANGE = 1.0  # R
WEIGHT_SCALE = 100_000  # S, the bound on each n_k
SITES = 10
CHANGE_SCALE = 0.1  # each site's change is N(0, (R/10)^2), clipped to ±R by the codec
TARGET_ERROR_OVER_R = 1e-6
TARGET_BYTES = 8.0
# (bits, max_sites): with t = 2^46, bits + log2(max_sites) ≤ 23 packs two values to a coefficient
# (16 bits with 128 sites) and ≤ 46 one (20 to 32 bits with 128 sites, 40 bits with at most 64).
# 20 bits two to a coefficient would allow only 8 sites, fewer than the 10 summed here.
SETTINGS = ((16, 128), (20, 128), (24, 128), (32, 128), (40, 64))
MIXES = {"small": WEIGHT_SCALE // 100, "large": WEIGHT_SCALE}


def measure(settings: PackingSettings, params: int, mix: str, material: Any, seed: int) -> dict[str, Any]:
    """One row: encrypt 10 sites' weighted changes, sum encrypted, decrypt the weighted mean."""
    secret = codec_for(PACKED_FORMAT_ID, load_secret_context(material.secret_context), options=settings)
    aggregator = codec_for(PACKED_FORMAT_ID, load_evaluation_context(material.evaluation_context), options=settings)
    rng = np.random.default_rng(seed)
    n_k = MIXES[mix]
    total = np.zeros(params)
    samples = 0
    updates: list[list[bytes]] = []
    start = time.perf_counter()
    for _ in range(SITES):
        change = np.clip(rng.normal(0.0, CHANGE_SCALE * settings.clip_range, params), -CLIP_RANGE, CLIP_RANGE)
        updates.append(secret.encrypt_update(change * n_k / WEIGHT_SCALE))
        total += change * n_k
        samples += n_k
    encrypt_s = (time.perf_counter() - start) / SITES
    summed = aggregator.sum_updates(updates, params)
    mean = secret.decrypt_aggregate(summed, params) * WEIGHT_SCALE / samples
    true_mean = total / samples
    error = mean - true_mean
    max_error = float(np.max(np.abs(error)))
    rms_error = float(np.sqrt(np.mean(error**2)))
    rms_change = float(np.sqrt(np.mean(true_mean**2)))
    upload = sum(len(chunk) for chunk in updates[0])
    bound = SITES * settings.step * WEIGHT_SCALE / samples
    return {
        "bits": settings.bits,
        "max_sites": settings.max_sites,
        "sites": f"{SITES} {mix} (n_k = {n_k:,})",
        "params": params,
        "bytes_per_param": upload / params,
        "planned_bytes_per_param": upload_bytes(settings, params) / params,
        "bytes_per_value": bytes_per_value(settings),
        "max_error_over_r": max_error / settings.clip_range,
        "rms_error_over_r": rms_error / settings.clip_range,
        "rms_error_over_change": rms_error / rms_change,
        "bound_over_r": bound / settings.clip_range,
        "encrypt_s_per_site": encrypt_s,
        "meets_target": "yes"
        if max_error / settings.clip_range <= TARGET_ERROR_OVER_R and upload / params <= TARGET_BYTES
        else "no",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="200,000 parameters (at 100,000 padding passes 8 bytes)")
    args = parser.parse_args(argv)
    params = 200_000 if args.quick else args.params
    args.out.mkdir(parents=True, exist_ok=True)
    material = create_key_material(BfvParameters())
    rows = []
    for index, (bits, max_sites) in enumerate(SETTINGS):
        settings = PackingSettings(clip_range=CLIP_RANGE, bits=bits, max_sites=max_sites)
        check_packing(settings)
        for mix in MIXES:
            row = measure(settings, params, mix, material, seed=100 + index)
            rows.append(row)
            print(json.dumps(row))
    meeting = sorted({(r["bits"], r["max_sites"]) for r in rows if r["meets_target"] == "yes"})
    every_mix = [
        s for s in meeting if all(r["meets_target"] == "yes" for r in rows if (r["bits"], r["max_sites"]) == s)
    ]
    verdict = (
        "meets it for small and large sites: " + ", ".join(f"bits={b}, max_sites={m}" for b, m in every_mix)
        if every_mix
        else "no setting meets it for both small and large sites"
    )
    machine = machine_description()
    (args.out / "precision.json").write_text(
        json.dumps({"machine": machine, "rows": rows, "target_met_by": every_mix}, indent=2) + "\n"
    )
    columns = [
        "bits",
        "max_sites",
        "sites",
        "params",
        "bytes_per_param",
        "planned_bytes_per_param",
        "bytes_per_value",
        "max_error_over_r",
        "rms_error_over_r",
        "rms_error_over_change",
        "bound_over_r",
        "encrypt_s_per_site",
        "meets_target",
    ]
    write_markdown_table(
        args.out / "precision.md",
        "Packed codec precision: bytes per parameter and error of the weighted mean by bits",
        machine,
        rows,
        columns,
        notes=[
            f"Format {PACKED_FORMAT_ID}, default BFV parameters (n = 8192, t = 2^46, one 60-bit data prime); real "
            f"encryption, the aggregator's encrypted sum, decryption. R = {CLIP_RANGE:g}, S = {WEIGHT_SCALE:,}, "
            f"{SITES} sites, each change N(0, (R/10)^2); small sites have n_k = S/100, large ones n_k = S.",
            "bytes_per_param: one site's measured upload (compact ciphertexts) per parameter; planned_bytes_per_param: "
            "fedhe.he.packing.upload_bytes over the parameters, from the packing layout alone; bytes_per_value: "
            "fedhe.he.packing.bytes_per_value, the same without the last ciphertext's padding (the job plan shows it).",
            "max_error_over_r / rms_error_over_r: error of the decrypted weighted mean against the exact one, over R; "
            "rms_error_over_change: RMS error over the RMS of the exact weighted mean; bound_over_r: the worst case "
            "k·Δ·S/Σn_k over R.",
            f"Target (issue 18): max error of the weighted mean ≤ {TARGET_ERROR_OVER_R:g} × R at ≤ {TARGET_BYTES:g} "
            f"bytes per parameter; {verdict}.",
            f"Command: python -m bench.precision --params {params}",
        ],
    )
    print(f"wrote {args.out / 'precision.md'}")


if __name__ == "__main__":
    main()
