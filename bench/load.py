"""Load benchmark: many sites upload concurrently, for several rounds, to two aggregator replicas.

Real keyserver, two real aggregator processes over TLS, real Postgres and a Redis of our own;
every simulated site is a provisioned federation member with its own credential, uploading a
real packed (``bfv-packed-v1``) update to a random replica, all at once. Reports upload latency
percentiles, the time from the round's closing to its published aggregate (the close), the CPU
seconds per MB received of the replicas and, separately, of the Postgres backends serving the
aggregator's database (while the uploads stream in, and with the close), each replica's peak
memory above its idle baseline against one encrypted update, and checks that
every round published exactly the accepted updates: the decrypted mean equals the plaintext
weighted mean within the packed codec's error bound, and the round counts every site once.

    python -m bench.load --sites 50 200 --rounds 3 --params 1000000 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
from numpy.typing import NDArray

from bench.reporting import machine_description, markdown_table, write_markdown
from fedhe.api_client import KeyserverClient
from fedhe.auth import KEY_RELEASE_PURPOSE, private_key_from_pem, sign_request
from fedhe.environment import current as current_environment
from fedhe.errors import FedheError
from fedhe.global_model import Decryption, decode_aggregate, weighted_update
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


def _cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of ``pid`` so far, or None if it has ended."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


class CpuMeter:
    """CPU seconds of the replicas (with their summing processes), of the Postgres backends serving
    the benchmark's database and of Postgres's shared background processes (WAL writer,
    checkpointer, ...), sampled every ``interval`` seconds on a background thread with wall-clock
    times, so that any window (the uploads streaming in, up to the round's ``closed_at``; the
    close, up to its ``published_at``) can be read afterwards.

    Every sample looks for new processes: the replicas' descendants in ``/proc``, the backends in
    ``pg_stat_activity`` (by the database's name, so other databases' clients on the same server
    are not counted; the query itself runs from the ``postgres`` database, which is not counted
    either). One that appears after the start counts from its start (its CPU before it was seen
    lands in the sample that saw it), one that ends keeps its last reading; a backend that starts
    and ends between two samples is missed (the aggregator keeps a pool of connections).
    """

    def __init__(self, replica_pids: list[int], database: str, interval: float = 0.1) -> None:
        self.database = database
        self.interval = interval
        self.samples: list[tuple[float, float, float, float]] = []  # (time.time(), replicas, database, shared)
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._groups: dict[str, set[int]] = {"replicas": set(replica_pids), "database": set(), "shared": set()}
        self._parents: dict[int, int | None] = {}
        self._stop = threading.Event()
        self._conn = psycopg.connect(POSTGRES, autocommit=True)
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)

    def start(self) -> None:
        self._discover(at_start=True)
        self._sample()
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            self._sample()
        self._conn.close()

    def _replica_descendants(self) -> set[int]:
        running = {int(name) for name in os.listdir("/proc") if name.isdigit()}
        for pid in running - self._parents.keys():
            self._parents[pid] = _parent(pid)
        for pid in self._parents.keys() - running:
            del self._parents[pid]
        found = set(self._groups["replicas"])
        while more := {pid for pid, parent in self._parents.items() if parent in found and pid not in found}:
            found |= more
        return found

    def _discover(self, *, at_start: bool = False) -> None:
        rows = self._conn.execute(
            "SELECT pid, datname FROM pg_stat_activity WHERE datname = %s OR datname IS NULL", [self.database]
        ).fetchall()
        found = [(pid, "shared" if datname is None else "database") for pid, datname in rows]
        found += [(pid, "replicas") for pid in self._replica_descendants()]
        for pid, group in found:
            if pid in self._first:
                continue
            self._groups[group].add(pid)
            # One first seen after the start began after it (it was not there then): all its CPU counts.
            self._first[pid] = (_cpu_seconds(pid) or 0.0) if at_start else 0.0
            self._last[pid] = self._first[pid]

    def _total(self, group: str) -> float:
        for pid in self._groups[group]:
            now = _cpu_seconds(pid)
            if now is not None:
                self._last[pid] = now
        return sum(self._last[pid] - self._first[pid] for pid in self._groups[group])

    def _sample(self) -> None:
        when = time.time()
        self.samples.append((when, self._total("replicas"), self._total("database"), self._total("shared")))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._discover()
            self._sample()

    def at(self, when: float) -> tuple[float, float, float]:
        """(replicas, database backends, shared Postgres processes) CPU seconds at ``when``, interpolated."""
        times = [sample[0] for sample in self.samples]
        return (
            float(np.interp(when, times, [sample[1] for sample in self.samples])),
            float(np.interp(when, times, [sample[2] for sample in self.samples])),
            float(np.interp(when, times, [sample[3] for sample in self.samples])),
        )


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
                    # Plain encrypted uploads (no masks, statements or phases): the intake and the sum
                    # alone; bench.secagg measures what secure aggregation adds.
                    secure_aggregation=None,
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
        meter = CpuMeter([r.process.pid for r in replicas], ag_name)
        meter.start()
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

            started, started_wall = time.perf_counter(), time.time()
            with ThreadPoolExecutor(max_workers=sites) as pool:
                results = list(pool.map(upload, range(sites)))
            last_upload = max(done for _, _, done in results)
            statuses = [status for status, _, _ in results]
            latencies += [seconds for _, seconds, _ in results]
            if statuses.count(201) != sites:
                logs = "\n".join(r.tail(30) for r in replicas)
                raise RuntimeError(f"round {number}: upload statuses {sorted(set(statuses))}\n{logs}")
            published = _await_aggregate(urls[1], members[0], secrets, job.id, number)
            mean = decode_aggregate(published, lambda _, facts: Decryption(codec, None, facts.num_inputs)).values
            expected = np.average(np.stack([w for w, _ in changes]), axis=0, weights=[n for _, n in changes])
            error = float(np.max(np.abs(mean - expected)))
            bound = packing.sum_error_bound(sites) * WEIGHT_SCALE / sum(n for _, n in changes)
            with secrets.aggregator_admin(urls[0]) as operator:
                served = operator.round(job.id, number)
            if served.closed_at is None or served.published_at is None:
                raise RuntimeError(f"round {number} was published without closed_at and published_at")
            closed, done = served.closed_at.timestamp(), served.published_at.timestamp()
            # Wait for a sample past the publication, so the close's window is read, not extrapolated.
            while meter.samples[-1][0] <= done:
                if not meter.running:
                    raise RuntimeError("the CPU meter's thread ended early")
                time.sleep(meter.interval)
            at_start, at_close, at_end = meter.at(started_wall), meter.at(closed), meter.at(done)
            megabytes = update_bytes * sites / 1e6
            round_rows.append(
                {
                    "round": number,
                    "accepted_201": statuses.count(201),
                    "counted": served.num_submissions,
                    "uploads_wall_s": last_upload - started,
                    "stream_s": closed - started_wall,
                    "close_s": done - closed,
                    "megabytes": megabytes,
                    # CPU seconds from the first upload's start to the round's closing (the uploads
                    # streaming in), and from there to its publication (the sum).
                    "replicas_stream_cpu_s": at_close[0] - at_start[0],
                    "replicas_close_cpu_s": at_end[0] - at_close[0],
                    "postgres_stream_cpu_s": at_close[1] - at_start[1],
                    "postgres_close_cpu_s": at_end[1] - at_close[1],
                    "postgres_shared_cpu_s": at_end[2] - at_start[2],
                    "max_abs_error": error,
                    "error_bound": bound,
                }
            )
            print(json.dumps(round_rows[-1]), flush=True)
            if error > bound:
                raise RuntimeError(f"round {number}: error {error:.3e} beyond the codec's bound {bound:.3e}")
        meter.stop()
        peaks = [_rss_mib(r, "VmHWM") for r in replicas]
        wall = sum(r["uploads_wall_s"] for r in round_rows)
        # The first round warms up (connections, TLS sessions, and its close starts each summing
        # replica's worker processes, a one-off): with more than one round, CPU counts the others.
        steady = round_rows[1:] or round_rows
        megabytes = sum(r["megabytes"] for r in steady)

        def per_mb(*keys: str) -> float:
            return sum(r[key] for r in steady for key in keys) / megabytes

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
            "cpu_rounds": len(steady),
            "megabytes": megabytes,
            "replicas_cpu_s_per_mb": per_mb("replicas_stream_cpu_s"),
            "replicas_cpu_s_per_mb_with_close": per_mb("replicas_stream_cpu_s", "replicas_close_cpu_s"),
            "postgres_cpu_s_per_mb": per_mb("postgres_stream_cpu_s"),
            "postgres_cpu_s_per_mb_with_close": per_mb("postgres_stream_cpu_s", "postgres_close_cpu_s"),
            "postgres_shared_cpu_s_per_mb": per_mb("postgres_shared_cpu_s"),
            "intake_cpu_s_per_mb": per_mb("replicas_stream_cpu_s", "postgres_stream_cpu_s"),
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


INTAKE_CPU_TARGET_S_PER_MB = 0.01
"""Issue 18: the intake's CPU (replicas and Postgres) per MB received."""
UPLOAD_P95_TARGET_S = 2.0
"""Issue 10: upload latency p95 with 50 concurrent sites, 1M parameters, two replicas."""

UPLOAD_COLUMNS = [
    "sites",
    "rounds",
    "params",
    "replicas",
    "update_bytes",
    "upload_p50_s",
    "upload_p95_s",
    "upload_max_s",
    "intake_mb_per_s",
    "close_s_mean",
    "replica_peak_above_idle_mib",
    "peak_vs_one_update",
    "lost_or_double_counted",
    "max_error_over_bound",
]
CPU_COLUMNS = [
    "sites",
    "cpu_rounds",
    "megabytes",
    "replicas_cpu_s_per_mb",
    "replicas_cpu_s_per_mb_with_close",
    "postgres_cpu_s_per_mb",
    "postgres_cpu_s_per_mb_with_close",
    "postgres_shared_cpu_s_per_mb",
    "intake_cpu_s_per_mb",
]


def _met(ok: bool) -> str:
    return "yes" if ok else "no"


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run's figures beside the targets they are measured against."""
    rows = []
    for result in results:
        cpu = result["intake_cpu_s_per_mb"]
        rows.append(
            {
                "target": f"intake CPU (replicas + Postgres) per MB <= {INTAKE_CPU_TARGET_S_PER_MB} s",
                "sites": result["sites"],
                "measured": f"{cpu:.3g} s/MB (replicas {result['replicas_cpu_s_per_mb']:.3g} + "
                f"Postgres {result['postgres_cpu_s_per_mb']:.3g}; replicas with the close "
                f"{result['replicas_cpu_s_per_mb_with_close']:.3g})",
                "met": _met(cpu <= INTAKE_CPU_TARGET_S_PER_MB),
            }
        )
    for result in results:
        p95 = result["upload_p95_s"]
        applies = result["sites"] == 50 and result["replicas"] == 2 and 900_000 <= result["params"] <= 1_100_000
        rows.append(
            {
                "target": f"upload p95 <= {UPLOAD_P95_TARGET_S:g} s, 50 sites, 1M parameters, 2 replicas",
                "sites": result["sites"],
                "measured": f"p95 {p95:.3g} s (p50 {result['upload_p50_s']:.3g} s, max {result['upload_max_s']:.3g} s)",
                "met": _met(p95 <= UPLOAD_P95_TARGET_S) if applies else "n/a (the target is for 50 sites at 1M)",
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sites", type=int, nargs="+", default=[50, 200])
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per site count; CPU counts those after the first (default 3)"
    )
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for sites in args.sites:
        with tempfile.TemporaryDirectory(prefix="fedhe-load-") as scratch:
            results.append(run(sites, args.rounds, args.params, Path(scratch)))
    machine = machine_description()
    sites = " ".join(str(n) for n in args.sites)
    command = f"python -m bench.load --sites {sites} --rounds {args.rounds} --params {args.params}"
    (args.out / "load.json").write_text(json.dumps({"machine": machine, "command": command, "runs": results}, indent=2))
    summaries = []
    for result in results:
        summary = {k: v for k, v in result.items() if k != "rounds_detail"}
        summary["replica_peak_above_idle_mib"] = " / ".join(f"{v:.0f}" for v in result["replica_peak_above_idle_mib"])
        summaries.append(summary)
    write_markdown(
        args.out / "load.md",
        "Load: concurrent uploads to two replicas",
        machine,
        [
            markdown_table(targets(results), ["target", "sites", "measured", "met"]),
            markdown_table(summaries, UPLOAD_COLUMNS),
            [
                "upload_*: each upload's time from its request to its response, over every round; the upload "
                "that closes a round waits for the round's sum.",
                "close_s_mean: from the round's closing (its last upload accepted) to its publication (the sum), "
                "as the aggregator records them.",
                "peak_vs_one_update: the busier replica's peak RSS above its idle RSS, over one encrypted update's "
                "bytes.",
            ],
            markdown_table(summaries, CPU_COLUMNS),
            [
                "CPU seconds (user + system) per MB (10^6 bytes) of updates received, over the rounds after the "
                "first (cpu_rounds; the first warms up: connections, and its close starts the summing processes; "
                "load.json has every round); megabytes: those rounds' updates.",
                "replicas: both aggregator processes and their summing processes, from the first upload's start "
                "to the round's closing (the uploads streaming in); with_close: up to the round's publication "
                "(the sum included).",
                "postgres: the backends serving the aggregator's database, over the same windows; "
                "postgres_shared: the server's background processes (WAL writer, checkpointer, background "
                "writer), shared with any other database on the server, up to the publication.",
                f"intake_cpu_s_per_mb: replicas + postgres while streaming (target <= "
                f"{INTAKE_CPU_TARGET_S_PER_MB} s/MB).",
                f"Command: {command}",
            ],
        ],
    )
    print(json.dumps(summaries, indent=2))


if __name__ == "__main__":
    main()
