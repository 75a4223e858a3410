"""Load benchmark: many sites upload concurrently, for several rounds, to two aggregator replicas.

Real keyserver, two real aggregator processes over TLS, real Postgres and a Redis of our own;
every simulated site is a provisioned federation member with its own credential, uploading a
real packed (``bfv-packed-v1``) update to a random replica, all at once. Reports upload latency
percentiles, the time from the last upload to the published aggregate (the close), each
replica's peak memory above its idle baseline against one encrypted update, and checks that
every round published exactly the accepted updates: the decrypted mean equals the plaintext
weighted mean within the packed codec's error bound, and the round counts every site once.

    python -m bench.load --sites 50 200 --rounds 2 --params 1000000 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
from numpy.typing import NDArray

from bench.reporting import machine_description, write_markdown_table
from fedhe.api_client import KeyserverClient
from fedhe.auth import KEY_RELEASE_PURPOSE, private_key_from_pem, sign_request
from fedhe.environment import current as current_environment
from fedhe.errors import FedheError
from fedhe.global_model import decode_aggregate, weighted_update
from fedhe.he import (
    PACKED_FORMAT_ID,
    Envelope,
    PackingSettings,
    UpdateCodec,
    codec_for,
    encode_envelope,
    load_secret_context,
)
from fedhe.modelspec import ModelSpec
from fedhe.schemas import DEFAULT_CLIP_RANGE, FederationCreate, JobCreate, KeyReleaseRequest
from fedhe_demo.local_cluster import (
    UNLIMITED_RATES,
    ClusterSecrets,
    ManagedProcess,
    ProvisionedSite,
    RedisServer,
    free_port,
    provision_site,
    start_aggregator,
    start_keyserver,
    url,
)

WEIGHT_SCALE = 1000  # S: the benchmark draws every n_k in [100, 1000]
POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def _create_database(prefix: str) -> tuple[str, str]:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def _drop_databases(names: list[str]) -> None:
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _rss_mib(process: ManagedProcess, field: str) -> float:
    for line in Path(f"/proc/{process.process.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of ``pids`` so far (processes that ended are skipped)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _postgres_pids() -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/comm"):
        try:
            if stat.read_text().strip() == "postgres":
                pids.append(int(stat.parent.name))
        except OSError:
            continue
    return pids


def _site_codec(
    keyserver_url: str, secrets: ClusterSecrets, site: ProvisionedSite, key_id: str, packing: PackingSettings
) -> UpdateCodec:
    key = private_key_from_pem(site.signing_key_file.read_bytes())
    timestamp, nonce, signature = sign_request(key, KEY_RELEASE_PURPOSE, keyserver_url, [key_id])
    request = KeyReleaseRequest(site_id=site.site_id, timestamp=timestamp, nonce=nonce, signature=signature)
    with KeyserverClient(keyserver_url, tls=secrets.tls) as keyserver:
        secret = keyserver.secret_context(key_id, request)
    return codec_for(PACKED_FORMAT_ID, load_secret_context(secret), options=packing)


def _await_aggregate(base_url: str, site: ProvisionedSite, secrets: ClusterSecrets, job_id: str, number: int) -> bytes:
    deadline = time.monotonic() + 1800
    with httpx.Client(verify=secrets.tls.ssl_context(), timeout=600) as client:
        while time.monotonic() < deadline:
            response = client.get(
                f"{base_url}/v1/jobs/{job_id}/rounds/{number}/aggregate",
                headers={"Authorization": f"Bearer {site.credential}"},
            )
            if response.status_code == 200:
                return response.content
            if response.status_code != 409:
                raise RuntimeError(f"aggregate of round {number}: {response.status_code} {response.text}")
            time.sleep(0.2)
    raise RuntimeError(f"round {number} was not published within 30 minutes")


def run(sites: int, rounds: int, params: int, workdir: Path) -> dict[str, Any]:
    secrets = ClusterSecrets.generate(workdir / "secrets")
    redis_server = RedisServer(workdir)
    redis_server.start()
    databases: list[str] = []
    processes: list[ManagedProcess] = []
    try:
        ks_name, ks_db = _create_database("fedhe_load_ks")
        ag_name, ag_db = _create_database("fedhe_load_ag")
        databases += [ks_name, ag_name]
        ks_port = free_port()
        processes.append(
            start_keyserver(
                port=ks_port, database_url=ks_db, secrets=secrets, log_dir=workdir / "logs", extra_env=UNLIMITED_RATES
            )
        )
        ports = [free_port(), free_port()]
        replicas = [
            start_aggregator(
                port=port,
                database_url=ag_db,
                keyserver_url=url(ks_port),
                secrets=secrets,
                log_dir=workdir / "logs",
                name=f"aggregator-{port}",
                extra_env={**UNLIMITED_RATES, "FEDHE_AGGREGATOR_REDIS_URL": redis_server.url},
            )
            for port in ports
        ]
        processes += replicas
        urls = [url(port) for port in ports]
        # Two values per coefficient hold 16-bit values for up to 128 sites and 15-bit ones for 256.
        packing = PackingSettings(
            clip_range=DEFAULT_CLIP_RANGE, bits=16 if sites <= 128 else 15, max_sites=max(sites, 128)
        )
        with secrets.keyserver_admin(url(ks_port)) as keyserver:
            federation = keyserver.create_federation(FederationCreate(name="load"))
        model = ModelSpec(input_shape=[params // 2 - 1], num_classes=2)
        size = model.num_parameters()
        with secrets.aggregator_admin(urls[0]) as operator:
            job = operator.create_job(
                JobCreate(
                    name="load",
                    key_id=federation.key_id,
                    model=model,
                    rounds=rounds,
                    min_sites=sites,
                    round_deadline_s=3600,
                    max_samples_per_round=WEIGHT_SCALE,
                    packing=packing,
                )
            )
        members = [
            provision_site(
                aggregator_url=urls[0],
                keyserver_url=url(ks_port),
                secrets=secrets,
                directory=workdir / "sites",
                name=f"site{i}",
                federation_id=federation.id,
            )
            for i in range(sites)
        ]
        codec = _site_codec(url(ks_port), secrets, members[0], federation.key_id, packing)
        idle_rss = [_rss_mib(r, "VmRSS") for r in replicas]
        replica_pids = [r.process.pid for r in replicas]
        cpu_replicas = cpu_postgres = 0.0
        rng, chooser = np.random.default_rng(0), random.Random(0)
        environment = current_environment().model_dump()
        latencies: list[float] = []
        round_rows = []
        update_bytes = 0
        verify = secrets.tls.ssl_context()
        for number in range(rounds):
            changes: list[tuple[NDArray[np.float64], int]] = [
                (rng.uniform(-packing.clip_range, packing.clip_range, size), int(rng.integers(100, WEIGHT_SCALE + 1)))
                for _ in members
            ]
            bodies = [
                encode_envelope(
                    Envelope(
                        format_id=PACKED_FORMAT_ID,
                        key_id=federation.key_id,
                        num_values=size,
                        chunks=codec.encrypt_update(weighted_update(w, np.zeros(size), n, WEIGHT_SCALE)),
                        meta={"num_samples": n, "metrics": {}, "environment": environment},
                    )
                )
                for w, n in changes
            ]
            update_bytes = len(bodies[0])

            def upload(index: int, number: int = number, bodies: list[bytes] = bodies) -> tuple[int, float, float]:
                started = time.perf_counter()
                response = httpx.post(
                    f"{chooser.choice(urls)}/v1/jobs/{job.id}/rounds/{number}/updates",
                    content=bodies[index],
                    headers={"Authorization": f"Bearer {members[index].credential}"},
                    timeout=1800,
                    verify=verify,
                )
                return response.status_code, time.perf_counter() - started, time.perf_counter()

            started = time.perf_counter()
            before = _cpu_seconds(replica_pids), _cpu_seconds(_postgres_pids())
            with ThreadPoolExecutor(max_workers=sites) as pool:
                results = list(pool.map(upload, range(sites)))
            last_upload = max(done for _, _, done in results)
            # The last upload's response waits for the round's sum, so this includes the close.
            cpu_replicas += _cpu_seconds(replica_pids) - before[0]
            cpu_postgres += _cpu_seconds(_postgres_pids()) - before[1]
            statuses = [status for status, _, _ in results]
            latencies += [seconds for _, seconds, _ in results]
            if statuses.count(201) != sites:
                logs = "\n".join(r.tail(30) for r in replicas)
                raise RuntimeError(f"round {number}: upload statuses {sorted(set(statuses))}\n{logs}")
            published = _await_aggregate(urls[1], members[0], secrets, job.id, number)
            close_s = time.perf_counter() - last_upload
            mean = decode_aggregate(published, lambda env: codec).values
            expected = np.average(np.stack([w for w, _ in changes]), axis=0, weights=[n for _, n in changes])
            error = float(np.max(np.abs(mean - expected)))
            bound = packing.sum_error_bound(sites) * WEIGHT_SCALE / sum(n for _, n in changes)
            with secrets.aggregator_admin(urls[0]) as operator:
                counted = operator.round(job.id, number).num_submissions
            round_rows.append(
                {
                    "round": number,
                    "accepted_201": statuses.count(201),
                    "counted": counted,
                    "uploads_wall_s": last_upload - started,
                    "close_s": close_s,
                    "max_abs_error": error,
                    "error_bound": bound,
                }
            )
            print(json.dumps(round_rows[-1]), flush=True)
            if error > bound:
                raise RuntimeError(f"round {number}: error {error:.3e} beyond the codec's bound {bound:.3e}")
        peaks = [_rss_mib(r, "VmHWM") for r in replicas]
        wall = sum(r["uploads_wall_s"] for r in round_rows)
        return {
            "sites": sites,
            "rounds": rounds,
            "params": size,
            "replicas": len(replicas),
            "update_bytes": update_bytes,
            "upload_p50_s": float(np.percentile(latencies, 50)),
            "upload_p95_s": float(np.percentile(latencies, 95)),
            "upload_max_s": float(np.max(latencies)),
            "intake_mb_per_s": update_bytes * sites * rounds / wall / 1e6,
            "close_s_mean": float(np.mean([r["close_s"] for r in round_rows])),
            "replicas_cpu_s_per_upload": cpu_replicas / (sites * rounds),
            "postgres_cpu_s_per_upload": cpu_postgres / (sites * rounds),
            "replica_peak_above_idle_mib": [peak - idle for peak, idle in zip(peaks, idle_rss, strict=True)],
            "peak_vs_one_update": max(peak - idle for peak, idle in zip(peaks, idle_rss, strict=True))
            * 1024
            * 1024
            / update_bytes,
            "lost_or_double_counted": sum(abs(r["counted"] - sites) for r in round_rows),
            "max_error_over_bound": max(r["max_abs_error"] / r["error_bound"] for r in round_rows),
            "rounds_detail": round_rows,
        }
    except FedheError as exc:
        raise RuntimeError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        for process in reversed(processes):
            process.stop()
        redis_server.kill()
        _drop_databases(databases)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sites", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for sites in args.sites:
        with tempfile.TemporaryDirectory(prefix="fedhe-load-") as scratch:
            results.append(run(sites, args.rounds, args.params, Path(scratch)))
    machine = machine_description()
    (args.out / "load.json").write_text(json.dumps({"machine": machine, "runs": results}, indent=2))
    summaries = []
    for result in results:
        summary = {k: v for k, v in result.items() if k != "rounds_detail"}
        summary["replica_peak_above_idle_mib"] = " / ".join(f"{v:.0f}" for v in result["replica_peak_above_idle_mib"])
        summaries.append(summary)
    write_markdown_table(
        args.out / "load.md",
        "Load: concurrent uploads to two replicas",
        machine,
        summaries,
        list(summaries[0]),
        notes=[
            "close_s: from the last upload's response to the aggregate being readable (the fold and publish).",
            "peak_vs_one_update: the busier replica's peak RSS above its idle RSS, over one encrypted update's bytes.",
            "cpu_s_per_upload: CPU time of both replicas (and of every Postgres process) while the uploads ran, "
            "including the close that the last upload waits for, per upload.",
        ],
    )
    print(json.dumps(summaries, indent=2))


if __name__ == "__main__":
    main()
