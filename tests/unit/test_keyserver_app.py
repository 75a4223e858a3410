"""The keyserver through its FastAPI app, in process, on SQLite; then the aggregator behind it.

A federation is created with its HE context, a site admitted with its key pinned; the site gets
the secret context only with a fresh signature of its pinned key, the aggregator only the keyless
one. The last test runs both apps in this process, the aggregator taking contexts and members
from the keyserver through the real ``KeyserverClient``: a round of two member sites published
and decrypted with the released secret context. tests/integration covers the same over TLS
with real processes and Postgres (test_sites_and_keys, test_limits, test_federation).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedhe.api_client import AggregatorClient
from fedhe.auth import PINNED_KEYS_PURPOSE, sign_request
from fedhe.environment import current as current_environment
from fedhe.errors import NotFound, PermissionDenied, Unauthenticated
from fedhe.he import (
    PACKED_FORMAT_ID,
    Envelope,
    PackingSettings,
    codec_for,
    decode_envelope,
    encode_envelope,
    load_evaluation_context,
    load_secret_context,
)
from fedhe.schemas import DEFAULT_CLIP_RANGE, FederationCreate, MemberStatus, PinnedKeysRequest, RoundState
from tests.factories import plain_job_create, site_identity
from tests.unit.service_fakes import (
    BASE_URL,
    INSECURE,
    KEYSERVER_AUDIENCE,
    InProcessKeyserver,
    aggregator_over,
    key_release,
    keyserver_app,
)

SITE_ID = "site-" + "5" * 16


@pytest.fixture
def keyserver(tmp_path: Path) -> Iterator[InProcessKeyserver]:
    with keyserver_app(tmp_path) as running:
        yield running


def test_a_member_gets_the_secret_context_only_with_a_fresh_signature_of_its_pinned_key(
    keyserver: InProcessKeyserver,
) -> None:
    federation = keyserver.admin.create_federation(FederationCreate(name="hospitals"))
    site = site_identity("hospital-a")
    member = keyserver.admin.add_member(federation.id, site.member_create(SITE_ID))
    assert (member.status, member.public_key) == (MemberStatus.ACTIVE, site.public_key)

    with keyserver.client() as anonymous:
        request = key_release(site, SITE_ID, federation.key_id)
        secret = anonymous.secret_context(federation.key_id, request)
        with pytest.raises(Unauthenticated):  # the same signed request twice: its nonce is spent
            anonymous.secret_context(federation.key_id, request)
        with pytest.raises(Unauthenticated):  # signed by another key than the pinned one
            anonymous.secret_context(
                federation.key_id, key_release(site_identity("forger"), SITE_ID, federation.key_id)
            )
        stranger = site_identity("stranger")
        with pytest.raises((Unauthenticated, NotFound, PermissionDenied)):
            anonymous.secret_context(federation.key_id, key_release(stranger, "site-" + "6" * 16, federation.key_id))

    # The released context decrypts what the aggregator's keyless one cannot: a round trip.
    evaluation = keyserver.aggregator.evaluation_context(federation.key_id)
    load_evaluation_context(evaluation)  # keyless: the aggregator may load it
    codec = codec_for(
        PACKED_FORMAT_ID, load_secret_context(secret), options=PackingSettings(clip_range=DEFAULT_CLIP_RANGE)
    )
    values = np.array([0.5, -0.25, 0.125])
    np.testing.assert_allclose(codec.decrypt_aggregate(codec.encrypt_update(values), 3), values, atol=1e-4)

    revoked = keyserver.admin.revoke_member(federation.id, SITE_ID)
    assert revoked.status == MemberStatus.REVOKED
    with keyserver.client() as anonymous, pytest.raises(PermissionDenied):
        anonymous.secret_context(federation.key_id, key_release(site, SITE_ID, federation.key_id))


def test_the_aggregator_sees_members_and_contexts_but_no_secret(keyserver: InProcessKeyserver) -> None:
    federation = keyserver.admin.create_federation(FederationCreate(name="hospitals"))
    site = site_identity("hospital-a")
    keyserver.admin.add_member(federation.id, site.member_create(SITE_ID))
    [member] = keyserver.aggregator.members(federation.id)
    assert (member.site_id, member.public_key, member.status) == (SITE_ID, site.public_key, MemberStatus.ACTIVE)
    info = keyserver.aggregator.context_info(federation.key_id)
    assert (info.key_id, info.federation_id, info.retired_at) == (federation.key_id, federation.id, None)
    with pytest.raises(PermissionDenied):  # the service identity may not manage the federation
        keyserver.aggregator.add_member(federation.id, site_identity("b").member_create("site-" + "7" * 16))

    timestamp, nonce, signature = sign_request(
        site.signing_key, PINNED_KEYS_PURPOSE, KEYSERVER_AUDIENCE, [federation.key_id]
    )
    request = PinnedKeysRequest(site_id=SITE_ID, timestamp=timestamp, nonce=nonce, signature=signature)
    with keyserver.client() as anonymous:
        pinned = anonymous.pinned_keys(federation.key_id, request)
    assert [(k.site_id, k.public_key) for k in pinned.members] == [(SITE_ID, site.public_key)]


def test_a_round_through_both_services_in_process(tmp_path: Path, keyserver: InProcessKeyserver) -> None:
    """The aggregator takes its contexts and members from the in-process keyserver's real client."""
    federation = keyserver.admin.create_federation(FederationCreate(name="hospitals"))
    with aggregator_over(tmp_path, keyserver.aggregator, keyserver_url=KEYSERVER_AUDIENCE) as (_, http, admin, _):
        job = admin.create_job(plain_job_create(federation.key_id))
        sites = []
        for name in ("a", "b"):  # every member admitted before the round takes uploads
            identity = site_identity(name)
            with AggregatorClient(BASE_URL, tls=INSECURE, transport=http._transport) as anonymous:
                site_id = anonymous.register_site(identity.site_create()).id
            credential = admin.approve_site(site_id).credential
            keyserver.admin.add_member(federation.id, identity.member_create(site_id))
            with keyserver.client() as ks:
                secret = ks.secret_context(federation.key_id, key_release(identity, site_id, federation.key_id))
            sites.append((credential, secret))
        values = [np.array([0.5, -0.25, 0.125, 0.0, -0.5, 0.75]), np.array([0.25, 0.25, -0.125, 0.5, 0.0, -0.25])]
        codec = codec_for(
            PACKED_FORMAT_ID, load_secret_context(sites[0][1]), options=PackingSettings(clip_range=DEFAULT_CLIP_RANGE)
        )
        assert sites[0][1] == sites[1][1], "both members hold the federation's one secret context"
        for (credential, _), update in zip(sites, values, strict=True):
            body = encode_envelope(
                Envelope(
                    format_id=PACKED_FORMAT_ID,
                    key_id=federation.key_id,
                    num_values=6,
                    chunks=codec.encrypt_update(update),
                    meta={"num_samples": 40, "metrics": {}, "environment": current_environment().model_dump()},
                )
            )
            with AggregatorClient(BASE_URL, credential, tls=INSECURE, transport=http._transport) as site:
                accepted = site.upload_update(job.id, 0, body)
        assert accepted.round_state == RoundState.PUBLISHED
        with AggregatorClient(BASE_URL, credential, tls=INSECURE, transport=http._transport) as site:
            aggregate = decode_envelope(site.aggregate(job.id, 0))
        summed = codec.decrypt_aggregate(aggregate.chunks, 6, summed_inputs=2)
        np.testing.assert_allclose(summed, values[0] + values[1], atol=1e-4)
        assert admin.round(job.id, 0).total_samples == 80
