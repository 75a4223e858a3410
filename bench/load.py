"""Load benchmark: many sites upload concurrently, for several rounds, to two aggregator replicas.

Real keyserver, two real aggregator processes, real Postgres and a real Redis of our own; each
simulated site holds the secret context and uploads a real encrypted update to a random
replica. Reports upload latency percentiles and each replica's peak memory, and checks that
every round published exactly the accepted updates (decrypted aggregate against plaintext).

    python -m bench.load --sites 50 --rounds 3 --params 100000 --out bench/results
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

from bench.reporting import machine_description, write_markdown_table
from fedhe.api_client import AggregatorClient, KeyserverClient
from fedhe.auth import private_key_from_pem, sign_key_release
from fedhe.environment import current as current_environment
from fedhe.global_model import decode_global_model, scale_for_upload
from fedhe.he import DEFAULT_FORMAT_ID, Envelope, codec_for, encode_envelope, load_secret_context
from fedhe.local_cluster import (
    ClusterSecrets,
    ManagedProcess,
    RedisServer,
    free_port,
    provision_site,
    start_aggregator,
    start_keyserver,
)
from fedhe.modelspec import ModelSpec
from fedhe.schemas import FederationCreate, JobCreate, KeyReleaseRequest

WEIGHT_SCALE = 100_000
POSTGRES = os.environ.get("FEDHE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _create_database(prefix: str) -> tuple[str, str]:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return name, f"{base}/{name}"


def _drop_databases(names: list[str]) -> None:
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _peak_rss_mib(process: ManagedProcess) -> float:
    for line in Path(f"/proc/{process.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(sites: int, rounds: int, params: int, workdir: Path) -> dict[str, Any]:
    secrets = ClusterSecrets.generate(workdir / "secrets")
    redis_server = RedisServer(workdir)
    redis_server.start()
    databases: list[str] = []
    processes: list[ManagedProcess] = []
    try:
        ks_name, ks_url_db = _create_database("fedhe_load_ks")
        ag_name, ag_url_db = _create_database("fedhe_load_ag")
        databases += [ks_name, ag_name]
        ks_port, ports = free_port(), [free_port(), free_port()]
        keyserver_url = f"http://127.0.0.1:{ks_port}"
        processes.append(
            start_keyserver(
                port=ks_port,
                database_url=ks_url_db,
                aggregator_url=f"http://127.0.0.1:{ports[0]}",
                secrets=secrets,
                log_dir=workdir / "logs",
            )
        )
        replicas = []
        for port in ports:
            replicas.append(
                start_aggregator(
                    port=port,
                    database_url=ag_url_db,
                    keyserver_url=keyserver_url,
                    secrets=secrets,
                    log_dir=workdir / "logs",
                    name=f"aggregator-{port}",
                    extra_env={"FEDHE_AGGREGATOR_REDIS_URL": redis_server.url},
                )
            )
        processes += replicas
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        operator = secrets.operator_token
        with KeyserverClient(keyserver_url, operator) as keyserver:
            key_id = keyserver.create_federation(FederationCreate(name="load")).key_id
        model = ModelSpec(input_dim=params // 2 - 1, num_classes=2)
        size = model.num_parameters()
        with AggregatorClient(urls[0], operator) as client:
            job = client.create_job(
                JobCreate(
                    name="load",
                    key_id=key_id,
                    model=model,
                    rounds=rounds,
                    min_sites=sites,
                    round_deadline_s=3600,
                    max_samples_per_round=WEIGHT_SCALE,
                )
            )
        members = [provision_site(urls[0], operator, workdir / "sites", f"site{i}") for i in range(sites)]
        first = members[0]
        ts_, sig = sign_key_release(private_key_from_pem(first.signing_key_file.read_bytes()), first.site_id, key_id)
        with KeyserverClient(keyserver_url) as keyserver:
            secret = keyserver.secret_context(
                key_id, KeyReleaseRequest(site_id=first.site_id, timestamp=ts_, signature=sig)
            )
        codec = codec_for(DEFAULT_FORMAT_ID, load_secret_context(secret))
        rng, chooser = np.random.default_rng(0), random.Random(0)
        latencies: list[float] = []
        round_rows = []
        errors: list[float] = []
        for number in range(rounds):
            updates = [(rng.uniform(-5, 5, size), int(rng.integers(10, 1000))) for _ in members]
            bodies = [
                encode_envelope(
                    Envelope(
                        format_id=DEFAULT_FORMAT_ID,
                        key_id=key_id,
                        num_values=size,
                        chunks=codec.encrypt_update(scale_for_upload(w, n, WEIGHT_SCALE)),
                        meta={"num_samples": n, "metrics": {}, "environment": current_environment().model_dump()},
                    )
                )
                for w, n in updates
            ]

            def upload(index: int, number: int = number, bodies: list[bytes] = bodies) -> tuple[int, float]:
                url = chooser.choice(urls)
                started = time.perf_counter()
                response = httpx.post(
                    f"{url}/v1/jobs/{job.id}/rounds/{number}/updates",
                    content=bodies[index],
                    headers={"Authorization": f"Bearer {members[index].credential}"},
                    timeout=600,
                )
                return response.status_code, time.perf_counter() - started

            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=sites) as pool:
                results = list(pool.map(upload, range(sites)))
            wall = time.perf_counter() - started
            statuses = [status for status, _ in results]
            latencies += [seconds for _, seconds in results]
            if statuses.count(201) != sites:
                logs = "\n".join(r.tail(30) for r in replicas)
                raise RuntimeError(f"round {number}: upload statuses {sorted(set(statuses))}: {statuses}\n{logs}")
            with AggregatorClient(urls[1], first.credential) as as_site:
                published = decode_global_model(as_site.model(job.id, number + 1), lambda env: codec)
            expected = np.average(np.stack([w for w, _ in updates]), axis=0, weights=[n for _, n in updates])
            errors.append(float(np.max(np.abs(published - expected))))
            with AggregatorClient(urls[0], operator) as client:
                counted = client.round(job.id, number).num_submissions
            round_rows.append(
                {
                    "round": number,
                    "accepted_201": statuses.count(201),
                    "counted": counted,
                    "round_wall_s": wall,
                    "max_abs_error": errors[-1],
                }
            )
            print(json.dumps(round_rows[-1]), flush=True)
        return {
            "sites": sites,
            "rounds": rounds,
            "params": size,
            "replicas": len(replicas),
            "update_bytes": len(bodies[0]),
            "upload_p50_s": float(np.percentile(latencies, 50)),
            "upload_p95_s": float(np.percentile(latencies, 95)),
            "upload_max_s": float(np.max(latencies)),
            "replica_peak_rss_mib": [_peak_rss_mib(r) for r in replicas],
            "lost_or_double_counted": sum(abs(r["counted"] - sites) for r in round_rows),
            "max_abs_error": max(errors),
            "rounds_detail": round_rows,
        }
    finally:
        for process in reversed(processes):
            process.stop()
        redis_server.kill()
        _drop_databases(databases)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sites", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedhe-load-") as scratch:
        result = run(args.sites, args.rounds, args.params, Path(scratch))
    result["machine"] = machine_description()
    (args.out / "load.json").write_text(json.dumps(result, indent=2))
    summary = {k: v for k, v in result.items() if k not in ("rounds_detail", "machine")}
    summary["replica_peak_rss_mib"] = " / ".join(f"{v:.0f}" for v in result["replica_peak_rss_mib"])
    columns = list(summary)
    write_markdown_table(
        args.out / "load.md", "Load: concurrent uploads to two replicas", result["machine"], [summary], columns
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
