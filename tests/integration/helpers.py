"""Helpers for integration tests: site keys, decryption as a site, and database snapshots."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import tenseal.sealapi as seal
from numpy.typing import NDArray
from sqlalchemy import Connection, create_engine, text

from fedhe.api_client import KeyserverClient
from fedhe.auth import KEY_RELEASE_PURPOSE, private_key_from_pem, sign_request
from fedhe.he import (
    PACKED_FORMAT_ID,
    PackedBfvCodec,
    PackingSettings,
    UpdateCodec,
    codec_for,
    format_for,
    load_secret_context,
)
from fedhe.he._seal.format import plaintext_coefficients
from fedhe.schemas import DEFAULT_CLIP_RANGE, KeyReleaseRequest
from fedhe_demo.local_cluster import ClusterSecrets, ManagedProcess, ProvisionedSite

DEFAULT_PACKING = PackingSettings(clip_range=DEFAULT_CLIP_RANGE)
"""What a job on a BFV federation packs with when it names no packing settings."""


def key_release_request(
    keyserver_url: str, site: ProvisionedSite, key_id: str, **overrides: object
) -> KeyReleaseRequest:
    """A signed key-release request as the agent makes it (fields in ``overrides`` replace the signed ones)."""
    key = private_key_from_pem(Path(site.signing_key_file).read_bytes())
    timestamp, nonce, signature = sign_request(key, KEY_RELEASE_PURPOSE, keyserver_url, [key_id])
    fields: dict[str, object] = {
        "site_id": site.site_id,
        "timestamp": timestamp,
        "nonce": nonce,
        "signature": signature,
    }
    return KeyReleaseRequest.model_validate(fields | overrides)


def release_secret(keyserver_url: str, secrets: ClusterSecrets, request: KeyReleaseRequest, key_id: str) -> bytes:
    """POST a key-release request as a site does (no bearer token)."""
    with KeyserverClient(keyserver_url, tls=secrets.tls) as client:
        return client.secret_context(key_id, request)


def site_codec(
    keyserver_url: str,
    secrets: ClusterSecrets,
    site: ProvisionedSite,
    key_id: str,
    packing: PackingSettings | None = DEFAULT_PACKING,
) -> UpdateCodec:
    """A codec with the secret context, released to ``site`` as the agent would get it (the
    context's default format; ``packing`` as the job has it for the packed codec)."""
    secret = release_secret(keyserver_url, secrets, key_release_request(keyserver_url, site, key_id), key_id)
    context = load_secret_context(secret)
    format_id = format_for(context)
    return codec_for(format_id, context, options=packing if format_id == PACKED_FORMAT_ID else None)


@contextmanager
def database_connection(database_url: str) -> Iterator[Connection]:
    """A short-lived connection to a service's database, read straight from Postgres."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def round_snapshot(database_url: str, job_id: str, number: int) -> dict[str, Any]:
    """Everything an upload could change about a round, read straight from Postgres."""
    with database_connection(database_url) as conn:
        row = conn.execute(
            text(
                "SELECT id, state, attempt, num_submissions, total_samples FROM rounds "
                "WHERE job_id = :job AND number = :n ORDER BY attempt DESC LIMIT 1"
            ),
            {"job": job_id, "n": number},
        ).one()
        submissions = conn.execute(
            text("SELECT site_id, sha256, upload_id FROM submissions WHERE round_id = :r ORDER BY id"), {"r": row.id}
        ).all()
        counted = conn.execute(
            text(
                "SELECT c.upload_id, c.index, c.data FROM upload_chunks c "
                "JOIN submissions s ON s.upload_id = c.upload_id WHERE s.round_id = :r ORDER BY c.upload_id, c.index"
            ),
            {"r": row.id},
        ).all()
        aggregate = conn.execute(
            text("SELECT data FROM aggregate_chunks WHERE round_id = :r ORDER BY index"), {"r": row.id}
        ).all()
        job = conn.execute(text("SELECT status, current_round FROM jobs WHERE id = :job"), {"job": job_id}).one()
    counted_digest = hashlib.sha256(b"".join(bytes(c.upload_id, "ascii") + bytes(c.data) for c in counted))
    return {
        "state": row.state,
        "attempt": row.attempt,
        "num_submissions": row.num_submissions,
        "total_samples": row.total_samples,
        "counted_chunks_sha256": counted_digest.hexdigest(),
        "aggregate_sha256": hashlib.sha256(b"".join(bytes(a.data) for a in aggregate)).hexdigest(),
        "submissions": [tuple(s) for s in submissions],
        "job": tuple(job),
    }


def stored_submissions(database_url: str, job_id: str, number: int) -> list[tuple[int, list[bytes]]]:
    """(n_k, ciphertext chunks) of every accepted upload of a round's published attempt."""
    with database_connection(database_url) as conn:
        rows = conn.execute(
            text(
                "SELECT s.num_samples, s.upload_id FROM submissions s JOIN rounds r ON r.id = s.round_id "
                "WHERE r.job_id = :job AND r.number = :n AND r.state = 'published' ORDER BY s.id"
            ),
            {"job": job_id, "n": number},
        ).all()
        result = []
        for num_samples, upload_id in rows:
            chunks = conn.execute(
                text("SELECT data FROM upload_chunks WHERE upload_id = :u ORDER BY index"), {"u": upload_id}
            ).all()
            result.append((int(num_samples), [bytes(c.data) for c in chunks]))
    return result


def stored_uploads(database_url: str, job_id: str, number: int) -> dict[str, list[bytes]]:
    """The ciphertext chunks of every counted upload of a round's latest attempt, by site, as the
    coordinator's database holds them."""
    with database_connection(database_url) as conn:
        rows = conn.execute(
            text(
                "SELECT s.site_id, c.data FROM submissions s JOIN upload_chunks c ON c.upload_id = s.upload_id "
                "WHERE s.round_id = (SELECT id FROM rounds WHERE job_id = :job AND number = :n "
                "ORDER BY attempt DESC LIMIT 1) ORDER BY s.site_id, c.index"
            ),
            {"job": job_id, "n": number},
        ).all()
    uploads: dict[str, list[bytes]] = {}
    for site_id, data in rows:
        uploads.setdefault(site_id, []).append(bytes(data))
    return uploads


def decrypted_coefficients(codec: PackedBfvCodec, chunks: list[bytes]) -> NDArray[np.uint64]:
    """The plaintext coefficients of stored chunks, decrypted with the federation's secret key (as a member can)."""
    decryptor = seal.Decryptor(codec._seal_context, codec._secret_key())
    out = np.zeros((len(chunks), codec.layout.poly_modulus_degree), dtype=np.uint64)
    plain = seal.Plaintext()
    for index, chunk in enumerate(chunks):
        decryptor.decrypt(codec.load_chunk(index, chunk), plain)
        words = plaintext_coefficients(codec.io.save(plain))
        out[index, : words.size] = words
    return out


def log_messages(log_path: Path) -> str:
    """A service's or agent's log messages, one per line (their logs are JSON lines; other lines are skipped)."""
    lines = log_path.read_text(encoding="utf-8").splitlines()
    return "\n".join(json.loads(line)["message"] for line in lines if line.startswith('{"time"'))


def finish_agents(agents: list[ManagedProcess], timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for every agent to exit, assert each exited 0, and stop any left."""
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(a.process.poll() is None for a in agents):
            time.sleep(1)
        for agent in agents:
            assert agent.process.returncode == 0, agent.tail()
    finally:
        for agent in agents:
            agent.stop()
