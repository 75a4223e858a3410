"""Every kind of bad upload gets a 4xx JSON error naming the problem and changes nothing.

A round snapshot (state, counts, hash of the running encrypted sum, the submissions, the
job's status) is read from Postgres before and after each bad upload and must be identical.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import httpx
import numpy as np
import pytest

from fedhe.environment import current as current_environment
from fedhe.he import DEFAULT_FORMAT_ID, Envelope, UpdateCodec, encode_envelope
from fedhe.schemas import FederationCreate
from fedhe_demo.local_cluster import ProvisionedSite, admit_member
from tests.conftest import Cluster
from tests.factories import job_create, model_spec
from tests.integration.helpers import round_snapshot, site_codec

NUM_VALUES = 10  # ModelSpec(input_dim=4, num_classes=2): 4x2 kernel + 2 biases


@dataclass
class Scene:
    cluster: Cluster
    job_id: str
    key_id: str
    codec: UpdateCodec
    other_key_codec: UpdateCodec
    other_key_id: str
    first: ProvisionedSite
    second: ProvisionedSite
    revoked: ProvisionedSite
    outsider: ProvisionedSite

    def envelope(
        self,
        *,
        codec: UpdateCodec | None = None,
        key_id: str | None = None,
        format_id: str = DEFAULT_FORMAT_ID,
        num_values: int = NUM_VALUES,
        chunks: list[bytes] | None = None,
        num_samples: object = 50,
        metrics: object = None,
        environment: object = None,
    ) -> bytes:
        codec = codec or self.codec
        if chunks is None:
            chunks = codec.encrypt_update(np.linspace(-0.05, 0.05, NUM_VALUES))
        return encode_envelope(
            Envelope(
                format_id=format_id,
                key_id=key_id or self.key_id,
                num_values=num_values,
                chunks=chunks,
                meta={
                    "num_samples": num_samples,
                    "metrics": {"loss": 0.5} if metrics is None else metrics,
                    "environment": current_environment().model_dump() if environment is None else environment,
                },
            )
        )

    def upload(
        self,
        body: bytes,
        *,
        site: ProvisionedSite | None = None,
        token: str | None = None,
        round_number: int = 0,
        job_id: str | None = None,
    ) -> httpx.Response:
        credential = token if token is not None else (site or self.second).credential
        headers = {"Content-Type": "application/octet-stream"}
        if credential:
            headers["Authorization"] = f"Bearer {credential}"
        return httpx.post(
            f"{self.cluster.aggregator_url}/v1/jobs/{job_id or self.job_id}/rounds/{round_number}/updates",
            content=body,
            headers=headers,
            timeout=60,
            verify=self.cluster.secrets.tls.ssl_context(),
        )


@pytest.fixture(scope="module")
def scene(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Scene:
    workdir = tmp_path_factory.mktemp("bad-uploads")
    with cluster.keyserver_admin() as keyserver:
        federation = keyserver.create_federation(FederationCreate(name="bad-uploads"))
        other = keyserver.create_federation(FederationCreate(name="another-federation"))
    request = job_create(
        federation.key_id,
        name="bad-uploads",
        model=model_spec(4),
        rounds=2,
        min_sites=2,
        round_deadline_s=3600,
        max_samples_per_round=1000,
        # The envelope's checks, on a round without secure aggregation; a secure round's signed
        # statements are refused the same way (test_secure_aggregation).
        secure_aggregation=None,
    )
    with cluster.aggregator_admin() as operator:
        job = operator.create_job(request)
        sites = [cluster.provision_site(workdir, f"s{i}", federation.id if i < 3 else None) for i in range(4)]
        operator.revoke_site(sites[2].site_id)
    admit_member(cluster.keyserver_url, cluster.secrets, other.id, sites[0], "s0")
    scene = Scene(
        cluster,
        job.id,
        federation.key_id,
        site_codec(cluster.keyserver_url, cluster.secrets, sites[0], federation.key_id),
        site_codec(cluster.keyserver_url, cluster.secrets, sites[0], other.key_id),
        other.key_id,
        sites[0],
        sites[1],
        sites[2],
        sites[3],
    )
    first = scene.upload(scene.envelope(), site=scene.first)
    assert first.status_code == 201, first.text
    assert first.json()["round_state"] == "collecting"
    return scene


BAD_UPLOADS: list[tuple[str, Callable[[Scene], httpx.Response], int, str]] = [
    ("unknown-credential", lambda s: s.upload(s.envelope(), token="fhs_not-a-real-credential"), 401, "unauthenticated"),
    ("no-credential", lambda s: s.upload(s.envelope(), token=""), 401, "unauthenticated"),
    ("revoked-site", lambda s: s.upload(s.envelope(), site=s.revoked), 403, "site_not_approved"),
    ("wrong-round", lambda s: s.upload(s.envelope(), round_number=1), 409, "wrong_round"),
    (
        "stale-key-id",
        lambda s: s.upload(s.envelope(codec=s.other_key_codec, key_id=s.other_key_id)),
        409,
        "stale_key_id",
    ),
    ("wrong-format-id", lambda s: s.upload(s.envelope(format_id="ckks-tenseal-v0")), 400, "unsupported_format"),
    ("garbage-ciphertext", lambda s: s.upload(s.envelope(chunks=[b"\x5e\xa1" * 3000])), 400, "invalid_ciphertext"),
    (
        "truncated-ciphertext",
        lambda s: s.upload(s.envelope(chunks=[s.codec.encrypt_update(np.ones(NUM_VALUES))[0][:-200]])),
        400,
        "invalid_ciphertext",
    ),
    ("truncated-body", lambda s: s.upload(s.envelope()[:-100]), 400, "truncated_update"),
    ("not-an-envelope", lambda s: s.upload(b'{"weights": [1, 2, 3]}'), 400, "invalid_envelope"),
    (
        "too-many-chunks",
        lambda s: s.upload(s.envelope(chunks=s.codec.encrypt_update(np.ones(NUM_VALUES)) * 2)),
        400,
        "wrong_chunk_count",
    ),
    ("wrong-num-values", lambda s: s.upload(s.envelope(num_values=11)), 400, "wrong_num_values"),
    ("negative-num-samples", lambda s: s.upload(s.envelope(num_samples=-5)), 400, "invalid_num_samples"),
    ("num-samples-over-bound", lambda s: s.upload(s.envelope(num_samples=1001)), 400, "invalid_num_samples"),
    ("num-samples-not-int", lambda s: s.upload(s.envelope(num_samples="50")), 400, "invalid_num_samples"),
    ("non-finite-metric", lambda s: s.upload(s.envelope(metrics={"loss": float("nan")})), 400, "invalid_metrics"),
    ("metric-not-a-number", lambda s: s.upload(s.envelope(metrics={"loss": "low"})), 400, "invalid_metrics"),
    ("duplicate", lambda s: s.upload(s.envelope(), site=s.first), 409, "duplicate_update"),
    (
        "other-tensorflow",
        lambda s: s.upload(s.envelope(environment=current_environment().model_dump() | {"tensorflow": "2.16.0"})),
        400,
        "environment_mismatch",
    ),
    ("no-environment", lambda s: s.upload(s.envelope(environment={})), 400, "environment_mismatch"),
    ("oversized-body", lambda s: s.upload(b"\0" * (4 * 1024 * 1024 + 1)), 413, "payload_too_large"),
    ("unknown-job", lambda s: s.upload(s.envelope(), job_id="job-0000000000000000"), 404, "not_found"),
    ("malformed-job-id", lambda s: s.upload(s.envelope(), job_id="job-..metrics"), 400, "invalid_request"),
    ("approved-non-member", lambda s: s.upload(s.envelope(), site=s.outsider), 404, "not_found"),
]


@pytest.mark.parametrize(
    ("make", "status", "code"), [case[1:] for case in BAD_UPLOADS], ids=[case[0] for case in BAD_UPLOADS]
)
def test_bad_upload_is_refused_and_changes_nothing(scene: Scene, make, status: int, code: str) -> None:
    before = round_snapshot(scene.cluster.aggregator_database_url, scene.job_id, 0)
    response = make(scene)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert round_snapshot(scene.cluster.aggregator_database_url, scene.job_id, 0) == before


def test_good_upload_after_the_bad_ones_closes_the_round_and_late_upload_gets_409(scene: Scene) -> None:
    accepted = scene.upload(scene.envelope(), site=scene.second)
    assert accepted.status_code == 201, accepted.text
    assert accepted.json()["round_state"] == "published"
    snapshot = round_snapshot(scene.cluster.aggregator_database_url, scene.job_id, 0)
    assert (snapshot["state"], snapshot["num_submissions"], snapshot["total_samples"]) == ("published", 2, 100)
    late = scene.upload(scene.envelope(), site=scene.first, round_number=0)
    assert late.status_code == 409
    assert late.json()["error"]["code"] == "wrong_round"
    assert late.json()["error"]["detail"] == {"current_round": 1}
    assert round_snapshot(scene.cluster.aggregator_database_url, scene.job_id, 0) == snapshot
