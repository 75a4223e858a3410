"""Member sites played by the test itself, one protocol step at a time, over TLS against the real services.

A ``ProtocolSite`` does what an agent does in a secure round (ADR 0010) with the same library
calls (``client_agent.secure_aggregation``), but only when the test says so, and keeps every
secret it holds: its X25519 keys, the shares it received, the federation's secret key. That is
what a colluding member brings to a coalition, what a site that vanishes at a given phase leaves
behind, and what a member that forges its input needs. Updates are arbitrary vectors; the
aggregator never looks inside them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tenseal.sealapi as seal
from numpy.typing import NDArray

from client_agent.secure_aggregation import (
    PreparedUpload,
    PublishedRound,
    check_roster,
    prepare_upload,
    published_masks,
    sign_advertisement,
    sign_statement,
    unmasking_answer,
)
from fedhe.api_client import AggregatorClient, KeyserverClient
from fedhe.auth import PINNED_KEYS_PURPOSE, private_key_from_pem, sign_request
from fedhe.environment import current as current_environment
from fedhe.errors import Conflict
from fedhe.global_model import AggregateFacts, Decryption, decode_aggregate
from fedhe.he import Envelope, PackedBfvCodec, encode_envelope
from fedhe.he._seal.format import compact_ciphertext, plaintext_bytes
from fedhe.he.packing import pack
from fedhe.schemas import JobPublic, PinnedKeysRequest, RoundPublic, RoundState
from fedhe.secagg.keys import AttemptKey
from fedhe.secagg.messages import AdvertisementCreate, Transcript, UploadStatement
from fedhe.secagg.statements import RoundAttempt, UploadFacts, chunks_sha256
from fedhe_demo.local_cluster import ClusterSecrets, ProvisionedSite
from tests.integration.helpers import site_codec


@dataclass
class ProtocolSite:
    """One member site, driven step by step by a test."""

    site: ProvisionedSite
    aggregator_url: str
    keyserver_url: str
    secrets: ClusterSecrets
    keys: dict[tuple[int, int], AttemptKey] = field(default_factory=dict)
    statements: dict[tuple[int, int], UploadStatement] = field(default_factory=dict)
    prepared: dict[tuple[int, int], PreparedUpload] = field(default_factory=dict)
    answered: dict[int, int] = field(default_factory=dict)

    @property
    def site_id(self) -> str:
        """The site's id."""
        return self.site.site_id

    def client(self) -> AggregatorClient:
        """An aggregator client holding the site's credential."""
        return AggregatorClient(self.aggregator_url, self.site.credential, tls=self.secrets.tls)

    def codec(self, job: JobPublic, number: int) -> PackedBfvCodec:
        """Round ``number``'s codec with the federation's secret key, released to this site as to an agent."""
        codec = site_codec(self.keyserver_url, self.secrets, self.site, job.key_id, job.round_packing(number))
        assert isinstance(codec, PackedBfvCodec)
        return codec

    def pinned(self, job: JobPublic) -> dict[str, str]:
        """The keyserver's pinned keys of the job's federation, asked for with a signed request."""
        key = private_key_from_pem(Path(self.site.signing_key_file).read_bytes())
        ts, nonce, signature = sign_request(key, PINNED_KEYS_PURPOSE, self.keyserver_url, [job.key_id])
        request = PinnedKeysRequest(site_id=self.site_id, timestamp=ts, nonce=nonce, signature=signature)
        with KeyserverClient(self.keyserver_url, tls=self.secrets.tls) as keyserver:
            return {m.site_id: m.public_key for m in keyserver.pinned_keys(job.key_id, request).members}

    def _signing_key(self) -> Any:
        return private_key_from_pem(Path(self.site.signing_key_file).read_bytes())

    def advertise(self, job: JobPublic, number: int, attempt: int) -> AttemptKey:
        """Advertise a fresh key for ``attempt`` of round ``number``."""
        key = self.keys.setdefault((number, attempt), AttemptKey.generate())
        at = RoundAttempt(job.id, number, attempt)
        body = AdvertisementCreate(
            attempt=attempt,
            public_key=key.public_key,
            signature=sign_advertisement(self._signing_key(), at, self.site_id, key),
        )
        with self.client() as client:
            client.advertise_key(job.id, number, body)
        return key

    def masked_upload(
        self,
        job: JobPublic,
        number: int,
        attempt: int,
        values: NDArray[Any],
        num_samples: int,
        *,
        forge_levels: NDArray[np.int64] | None = None,
    ) -> UploadStatement:
        """Mask ``values`` for the checked roster, encrypt, sign and upload them.

        With ``forge_levels`` the site skips quantisation and clipping and packs those integer
        levels directly: a member forging its input.
        """
        statement, chunks = self.masked(job, number, attempt, values, num_samples, forge_levels=forge_levels)
        with self.client() as client:
            client.upload_update(job.id, number, envelope_bytes(job, statement, chunks, len(values)))
        self.statements[(number, attempt)] = statement
        return statement

    def masked(
        self,
        job: JobPublic,
        number: int,
        attempt: int,
        values: NDArray[Any],
        num_samples: int,
        *,
        forge_levels: NDArray[np.int64] | None = None,
    ) -> tuple[UploadStatement, list[bytes]]:
        """The signed statement and masked ciphertext chunks of an upload, not sent."""
        at = RoundAttempt(job.id, number, attempt)
        assert job.threshold is not None
        with self.client() as client:
            roster = client.transcript(job.id, number, attempt=attempt).roster
        key = self.keys[(number, attempt)]
        check_roster(
            roster, at, self.site_id, key, self.pinned(job), min_members=job.min_sites, threshold=job.threshold
        )
        prepared = prepare_upload(at, self.site_id, key, roster)
        codec = self.codec(job, number)
        if forge_levels is None:
            chunks = codec.encrypt_update(values, masks=prepared.masks)
        else:
            chunks = forged_chunks(codec, forge_levels, prepared)
        statement = sign_statement(
            self._signing_key(),
            at,
            UploadFacts(key_id=job.key_id, format_id=job.format_id, num_values=len(values)),
            me=self.site_id,
            roster=roster,
            prepared=prepared,
            num_samples=num_samples,
            chunks_sha256=chunks_sha256(chunks),
        )
        self.prepared[(number, attempt)] = prepared
        return statement, chunks

    def answer(self, job: JobPublic, number: int, attempt: int) -> bool:
        """Answer the unmasking of ``attempt``, as an honest site does once the transcript checks out;
        False when the round no longer needed it (every seed could already be rebuilt: it closed)."""
        at = RoundAttempt(job.id, number, attempt)
        with self.client() as client:
            transcript = client.transcript(job.id, number, attempt=attempt)
            answer = unmasking_answer(
                transcript,
                at,
                self.site_id,
                self.keys[(number, attempt)],
                self.statements[(number, attempt)],
                self.pinned(job),
                UploadFacts(
                    key_id=job.key_id,
                    format_id=job.format_id,
                    num_values=job.round_num_values(number),
                ),
            )
            self.answered[number] = attempt
            try:
                client.answer_unmasking(job.id, number, answer)
            except Conflict as late:
                if late.code not in ("round_closed", "job_not_running", "wrong_round"):
                    raise
                return False
            return True

    def received_shares(self, job: JobPublic, number: int, attempt: int) -> Transcript:
        """The transcript as this site sees it: every statement, with the shares sealed for this site."""
        with self.client() as client:
            return client.transcript(job.id, number, attempt=attempt)

    def decrypt_published(self, job: JobPublic, number: int) -> NDArray[Any]:
        """Round ``number``'s published mean change, through every check an agent makes."""
        codec = self.codec(job, number)
        assert job.threshold is not None

        def prepare(envelope: Envelope, facts: AggregateFacts) -> Decryption:
            with self.client() as client:
                transcript = client.transcript(job.id, number, attempt=facts.attempt)
            masks = published_masks(
                transcript,
                RoundAttempt(job.id, number, facts.attempt),
                self.site_id,
                PublishedRound(
                    mine=self.statements.get((number, facts.attempt)), answered_attempt=self.answered.get(number)
                ),
                self.pinned(job),
                UploadFacts(key_id=job.key_id, format_id=job.format_id, num_values=envelope.num_values),
                min_statements=max(job.min_sites, job.threshold + 1),
                total_samples=facts.total_samples,
            )
            return Decryption(codec, masks, len(transcript.statements))

        with self.client() as client:
            return decode_aggregate(client.aggregate(job.id, number), prepare).values


def envelope_bytes(
    job: JobPublic,
    statement: UploadStatement | None,
    chunks: list[bytes],
    num_values: int,
    num_samples: int | None = None,
) -> bytes:
    """An upload's envelope as an agent sends it (``statement`` None: a secure round's upload without one)."""
    samples = statement.num_samples if statement is not None else num_samples
    meta: dict[str, Any] = {"num_samples": samples, "environment": current_environment().model_dump()}
    if statement is not None:
        meta["secagg"] = statement.model_dump()
    envelope = Envelope(format_id=job.format_id, key_id=job.key_id, num_values=num_values, chunks=chunks, meta=meta)
    return encode_envelope(envelope)


def forged_chunks(codec: PackedBfvCodec, levels: NDArray[np.int64], prepared: PreparedUpload) -> list[bytes]:
    """Ciphertexts of packed plaintexts built straight from integer levels (no clipping), masked."""
    coefficients = pack(levels, codec.layout)
    t_bits = codec.layout.plain_modulus_bits
    coefficients += prepared.masks.block(0, coefficients.shape[0], codec.layout.poly_modulus_degree, t_bits)
    coefficients &= np.uint64((1 << t_bits) - 1)
    encryptor = seal.Encryptor(codec._seal_context, codec._secret_key())
    return [
        compact_ciphertext(codec.io.save(encryptor.encrypt_symmetric(codec.io.load_plaintext(plaintext_bytes(row)))))
        for row in coefficients
    ]


def wait_for_round(
    client: AggregatorClient,
    job_id: str,
    number: int,
    done: Callable[[RoundPublic], bool],
    timeout_s: float = 60,
) -> RoundPublic:
    """Poll round ``number`` until ``done`` says so (or fail naming its last state)."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = client.round(job_id, number)
        if done(current):
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"round {number} stayed {current.state} (attempt {current.attempt}): {current}")
        time.sleep(0.1)


def in_state(*states: RoundState, attempt: int | None = None) -> Callable[[RoundPublic], bool]:
    """A ``wait_for_round`` condition: the round is in one of ``states`` (at ``attempt``, if given)."""
    return lambda r: r.state in states and (attempt is None or r.attempt == attempt)
