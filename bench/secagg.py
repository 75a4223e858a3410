"""What secure aggregation costs (ADR 0010), measured side by side with the same round without it.

For 3, 10 and 50 sites at 1M parameters (and the coordinator also at 100k), in one process,
with the real protocol code (``client_agent.secure_aggregation``, ``aggregator.secure_rounds``'s
primitives, the packed codec):

- **bytes a site sends in a round**: its signed key, the pinned-keys request, its masked upload
  (envelope, statement and sealed shares), its unmasking answer; against the same update's plain
  upload;
- **site CPU, one core**: masking and encrypting the update, against encrypting it alone; and
  decrypting the sum with the self masks removed, against decrypting alone;
- **coordinator CPU**: checking every statement's signature, summing the uploads chunk by chunk,
  checking every share and rebuilding every seed; per site and parameter, to show it grows
  linearly.

    python -m bench.secagg --out bench/results
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.reporting import machine_description, write_markdown_table
from client_agent.secure_aggregation import (
    PublishedRound,
    prepare_upload,
    published_masks,
    sign_advertisement,
    sign_statement,
    unmasking_answer,
)
from fedhe.auth import PINNED_KEYS_PURPOSE, generate_signing_key, public_key_b64, sign_request
from fedhe.he import (
    BfvParameters,
    Envelope,
    PackingSettings,
    codec_for,
    create_key_material,
    encode_envelope,
    load_evaluation_context,
    load_secret_context,
)
from fedhe.schemas import PinnedKeysRequest
from fedhe.secagg.keys import AttemptKey
from fedhe.secagg.messages import AdvertisementCreate, Roster, RosterEntry, Transcript, UploadStatement
from fedhe.secagg.shares import combine_shares
from fedhe.secagg.statements import (
    RoundAttempt,
    UploadFacts,
    chunks_sha256,
    positions,
    self_mask_commitment,
    share_commitment,
    signature_valid,
    upload_statement,
)

AT = RoundAttempt("job-" + "0" * 16, 1, 1)
KEY_ID = "key-" + "0" * 32


def _cpu(fn: Any) -> tuple[float, Any]:
    started = time.process_time()
    result = fn()
    return time.process_time() - started, result


def _sites(count: int) -> list[tuple[str, Any, AttemptKey]]:
    return [(f"site-{i:016x}", generate_signing_key(), AttemptKey.generate()) for i in range(1, count + 1)]


def _roster(sites: list[tuple[str, Any, AttemptKey]], threshold: int) -> Roster:
    entries = [
        RosterEntry(site_id=s, public_key=k.public_key, signature=sign_advertisement(sk, AT, s, k))
        for s, sk, k in sites
    ]
    return Roster(job_id=AT.job_id, round=AT.round, attempt=AT.attempt, threshold=threshold, members=entries)


def measure(num_sites: int, num_values: int) -> dict[str, Any]:
    """One secure round of ``num_sites`` sites at ``num_values`` values, every step of it."""
    material = create_key_material(BfvParameters())
    secret = load_secret_context(material.secret_context)
    packing = PackingSettings(clip_range=1.0, max_sites=max(128, num_sites))
    site_codec = codec_for("bfv-packed-v1", secret, 1, options=packing)
    coordinator_codec = codec_for(
        "bfv-packed-v1", load_evaluation_context(material.evaluation_context), options=packing
    )
    threshold = max(2, num_sites // 2)
    sites = _sites(num_sites)
    roster = _roster(sites, threshold)
    pinned = {s: public_key_b64(sk) for s, sk, _ in sites}
    facts = UploadFacts(key_id=KEY_ID, format_id="bfv-packed-v1", num_values=num_values)
    rng = np.random.default_rng(0)
    update = rng.normal(0, 0.01, num_values)

    plain_runs = [_cpu(lambda: site_codec.encrypt_update(update)) for _ in range(3)]
    plain_seconds, plain_chunks = float(np.median([seconds for seconds, _ in plain_runs])), plain_runs[-1][1]
    plain_envelope = encode_envelope(
        Envelope(
            format_id="bfv-packed-v1",
            key_id=KEY_ID,
            num_values=num_values,
            chunks=plain_chunks,
            meta={"num_samples": 100},
        )
    )
    statements: list[UploadStatement] = []
    uploads: list[list[bytes]] = []
    mask_seconds = []
    for site_id, signing, key in sites:
        seconds, (prepared, chunks) = _cpu(
            lambda site_id=site_id, key=key: (
                (p := prepare_upload(AT, site_id, key, roster)),
                site_codec.encrypt_update(update, masks=p.masks),
            )
        )
        mask_seconds.append(seconds)
        statements.append(
            sign_statement(
                signing,
                AT,
                facts,
                me=site_id,
                roster=roster,
                prepared=prepared,
                num_samples=100,
                chunks_sha256=chunks_sha256(chunks),
            )
        )
        uploads.append(chunks)
    me, my_signing, my_key = sites[0]
    advertisement = AdvertisementCreate(attempt=1, public_key=my_key.public_key, signature=roster.members[0].signature)
    ts, nonce, signature = sign_request(my_signing, PINNED_KEYS_PURPOSE, "https://keyserver.example", [KEY_ID])
    pinned_request = PinnedKeysRequest(site_id=me, timestamp=ts, nonce=nonce, signature=signature)
    secure_envelope = encode_envelope(
        Envelope(
            format_id="bfv-packed-v1",
            key_id=KEY_ID,
            num_values=num_values,
            chunks=uploads[0],
            meta={"num_samples": 100, "secagg": statements[0].model_dump()},
        )
    )
    transcript = Transcript(roster=roster, statements=statements)
    answers = {}
    for site_id, _, key in sites[: threshold + 1]:
        mine = next(s for s in statements if s.site_id == site_id)
        sealed_for_me = transcript.model_copy(
            update={
                "statements": [
                    s.model_copy(update={"sealed_shares": {h: v for h, v in s.sealed_shares.items() if h == site_id}})
                    for s in statements
                ]
            }
        )
        answers[site_id] = unmasking_answer(sealed_for_me, AT, site_id, key, mine, pinned, facts)
    sent = {
        "advertisement": len(advertisement.model_dump_json()),
        "pinned_keys_request": len(pinned_request.model_dump_json()),
        "upload": len(secure_envelope),
        "unmasking_answer": len(answers[me].model_dump_json()),
    }

    # The coordinator: every statement's signature, the sum, every share checked, every seed rebuilt.
    def coordinate() -> tuple[list[bytes], dict[str, str]]:
        for statement in statements:
            assert signature_valid(
                pinned[statement.site_id], upload_statement(AT, facts, statement), statement.signature
            )
        summed = [coordinator_codec.sum_chunk(i, (u[i] for u in uploads)) for i in range(len(uploads[0]))]
        place = positions(roster)
        seeds = {}
        for statement in statements:
            owner = statement.site_id
            shares = {}
            for holder, answer in answers.items():
                if holder == owner or len(shares) == threshold:
                    continue
                share = base64.b64decode(answer.shares[owner])
                assert share_commitment(AT, owner, holder, place[holder], share) == statement.share_commitments[holder]
                shares[place[holder]] = share
            seed = combine_shares(shares)
            assert self_mask_commitment(AT, owner, seed) == statement.self_mask_commitment
            seeds[owner] = base64.b64encode(seed).decode()
        return summed, seeds

    coordinator_seconds, (summed, seeds) = _cpu(coordinate)
    plain_sum_seconds, _ = _cpu(
        lambda: [
            coordinator_codec.sum_chunk(index, (plain_chunks[index] for _ in range(num_sites)))
            for index in range(len(plain_chunks))
        ]
    )
    published = transcript.model_copy(update={"self_mask_seeds": seeds})
    unmask_seconds, decrypted = _cpu(
        lambda: site_codec.decrypt_aggregate(
            summed,
            num_values,
            masks=published_masks(
                published,
                AT,
                me,
                PublishedRound(mine=statements[0], answered_attempt=1),
                pinned,
                facts,
                min_statements=threshold + 1,
                total_samples=100 * num_sites,
            ),
            summed_inputs=num_sites,
        )
    )
    decrypt_seconds, _ = _cpu(lambda: site_codec.decrypt_aggregate(summed, num_values))
    error = float(np.max(np.abs(decrypted - update * num_sites)))
    return {
        "sites": num_sites,
        "params": num_values,
        "t": threshold,
        "site_bytes_per_param": sum(sent.values()) / num_values,
        "plain_upload_bytes_per_param": len(plain_envelope) / num_values,
        "upload_bytes": sent["upload"],
        "other_bytes": sent["advertisement"] + sent["pinned_keys_request"] + sent["unmasking_answer"],
        "mask_encrypt_mparams_s": num_values / 1e6 / float(np.median(mask_seconds)),
        "encrypt_mparams_s": num_values / 1e6 / plain_seconds,
        "unmask_decrypt_s": unmask_seconds,
        "decrypt_s": decrypt_seconds,
        "coordinator_cpu_s": coordinator_seconds,
        "coordinator_sum_only_s": plain_sum_seconds,
        "coordinator_us_per_site_param": coordinator_seconds / (num_sites * num_values) * 1e6,
        "max_error": error,
        "error_bound": packing.sum_error_bound(num_sites),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cases = (
        [(3, 100_000), (10, 100_000)]
        if args.quick
        else [(3, 1_000_000), (10, 1_000_000), (50, 1_000_000), (10, 100_000), (50, 100_000)]
    )
    rows = []
    for sites, params in cases:
        rows.append(measure(sites, params))
        print(json.dumps(rows[-1]), flush=True)
    result = {"machine": machine_description(), "rows": rows}
    (args.out / "secagg.json").write_text(json.dumps(result, indent=2))
    write_markdown_table(
        args.out / "secagg.md",
        "Secure aggregation: bytes, site CPU and coordinator CPU",
        result["machine"],
        rows,
        list(rows[0]),
        notes=[
            "One process, CPU seconds (time.process_time), one core for the sites' work.",
            "site_bytes_per_param: everything a site sends in a round (signed key, pinned-keys request, "
            "masked upload with its statement and sealed shares, unmasking answer) per parameter; "
            "plain_upload_bytes_per_param: the same update's upload without secure aggregation.",
            "mask_encrypt_mparams_s: prepare the masks (n − 1 X25519 agreements, Shamir shares) and encrypt "
            "with them; encrypt_mparams_s: encrypt alone. unmask_decrypt_s: check the transcript, remove "
            "the self masks and decrypt the sum; decrypt_s: decrypt alone.",
            "coordinator_cpu_s: check every statement's signature, sum the uploads chunk by chunk, check "
            "t shares of every seed and rebuild it; coordinator_sum_only_s: the sum alone.",
        ],
    )


if __name__ == "__main__":
    main()
