"""HTTP clients for the keyserver and the aggregator (httpx), with errors mapped back.

A non-2xx answer becomes the same ``fedhe.errors`` class the service raised; a transport
failure becomes ``UpstreamUnavailable``. Callers therefore handle one hierarchy whether the
problem happened here or on the other side of the wire.
"""

from __future__ import annotations

from typing import Any, Self

import httpx

from fedhe.errors import UpstreamUnavailable, error_from_body
from fedhe.schemas import (
    AuditEventPublic,
    ContextInfo,
    EvaluationCreate,
    FederationCreate,
    FederationPublic,
    JobCreate,
    JobPublic,
    KeyReleaseRequest,
    RoundPublic,
    RoundVerification,
    SiteApproved,
    SiteCreate,
    SiteIdentity,
    SitePublic,
    UpdateAccepted,
)


class ServiceClient:
    """A base URL, a bearer token and error mapping around ``httpx.Client``."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        """Release the connection pool."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request; raise the mapped ``FedheError`` on any failure."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(f"{method} {self._http.base_url}{path} failed: {type(exc).__name__}") from exc
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            raise error_from_body(response.status_code, body)
        return response

    def audit_events(self, limit: int = 100) -> list[AuditEventPublic]:
        """Operator: the newest audit events."""
        events = self.request("GET", "/v1/audit", params={"limit": limit}).json()
        return [AuditEventPublic.model_validate(e) for e in events]


class KeyserverClient(ServiceClient):
    """Typed calls to the keyserver."""

    def create_federation(self, request: FederationCreate) -> FederationPublic:
        """Operator: create a federation."""
        return FederationPublic.model_validate(
            self.request("POST", "/v1/federations", json=request.model_dump()).json()
        )

    def rotate_key(self, federation_id: str) -> FederationPublic:
        """Operator: rotate a federation's key."""
        return FederationPublic.model_validate(self.request("POST", f"/v1/federations/{federation_id}/rotate").json())

    def federation(self, federation_id: str) -> FederationPublic:
        """Operator: one federation."""
        return FederationPublic.model_validate(self.request("GET", f"/v1/federations/{federation_id}").json())

    def context_info(self, key_id: str) -> ContextInfo:
        """Public facts about a context."""
        return ContextInfo.model_validate(self.request("GET", f"/v1/contexts/{key_id}").json())

    def evaluation_context(self, key_id: str) -> bytes:
        """Aggregator: the keyless evaluation context."""
        return self.request("GET", f"/v1/contexts/{key_id}/evaluation").content

    def secret_context(self, key_id: str, request: KeyReleaseRequest) -> bytes:
        """Site: the secret context, against a signed request."""
        return self.request("POST", f"/v1/contexts/{key_id}/secret", json=request.model_dump()).content


class AggregatorClient(ServiceClient):
    """Typed calls to the aggregator."""

    def register_site(self, request: SiteCreate) -> SitePublic:
        """Site admin: register (no credential needed)."""
        return SitePublic.model_validate(self.request("POST", "/v1/sites", json=request.model_dump()).json())

    def sites(self) -> list[SitePublic]:
        """Operator: all sites."""
        return [SitePublic.model_validate(s) for s in self.request("GET", "/v1/sites").json()]

    def approve_site(self, site_id: str) -> SiteApproved:
        """Operator: approve a site; the answer holds its credential, shown once."""
        return SiteApproved.model_validate(self.request("POST", f"/v1/sites/{site_id}/approve").json())

    def reject_site(self, site_id: str) -> SitePublic:
        """Operator: reject a pending site."""
        return SitePublic.model_validate(self.request("POST", f"/v1/sites/{site_id}/reject").json())

    def revoke_site(self, site_id: str) -> SitePublic:
        """Operator: revoke an approved site."""
        return SitePublic.model_validate(self.request("POST", f"/v1/sites/{site_id}/revoke").json())

    def site_identity(self, site_id: str) -> SiteIdentity:
        """Keyserver: a site's status and public key."""
        return SiteIdentity.model_validate(self.request("GET", f"/v1/internal/sites/{site_id}").json())

    def create_job(self, request: JobCreate) -> JobPublic:
        """Operator: create a job; round 0 opens at once."""
        return JobPublic.model_validate(self.request("POST", "/v1/jobs", json=request.model_dump(mode="json")).json())

    def jobs(self) -> list[JobPublic]:
        """Operator or site: all jobs."""
        return [JobPublic.model_validate(j) for j in self.request("GET", "/v1/jobs").json()]

    def job(self, job_id: str) -> JobPublic:
        """Operator or site: one job."""
        return JobPublic.model_validate(self.request("GET", f"/v1/jobs/{job_id}").json())

    def stop_job(self, job_id: str) -> JobPublic:
        """Operator: stop a running job."""
        return JobPublic.model_validate(self.request("POST", f"/v1/jobs/{job_id}/stop").json())

    def rounds(self, job_id: str) -> list[RoundPublic]:
        """Operator or site: every round attempt of a job."""
        return [RoundPublic.model_validate(r) for r in self.request("GET", f"/v1/jobs/{job_id}/rounds").json()]

    def round(self, job_id: str, number: int) -> RoundPublic:
        """Operator or site: the latest attempt of round ``number``."""
        return RoundPublic.model_validate(self.request("GET", f"/v1/jobs/{job_id}/rounds/{number}").json())

    def verify_round(self, job_id: str, number: int) -> RoundVerification:
        """Operator: rebuild a round's sum from its submissions and compare with the stored one."""
        return RoundVerification.model_validate(self.request("GET", f"/v1/jobs/{job_id}/rounds/{number}/verify").json())

    def model(self, job_id: str, number: int) -> bytes:
        """Site: the envelope holding round ``number``'s global model."""
        return self.request("GET", f"/v1/jobs/{job_id}/rounds/{number}/model").content

    def final_model(self, job_id: str) -> bytes:
        """Site: the envelope holding the job's final aggregate."""
        return self.request("GET", f"/v1/jobs/{job_id}/final-model").content

    def upload_update(
        self, job_id: str, number: int, envelope: bytes, idempotency_key: str | None = None
    ) -> UpdateAccepted:
        """Site: upload an encrypted update for round ``number`` (safe to retry with the same bytes)."""
        headers = {"Content-Type": "application/octet-stream"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        response = self.request("POST", f"/v1/jobs/{job_id}/rounds/{number}/updates", content=envelope, headers=headers)
        return UpdateAccepted.model_validate(response.json())

    def post_evaluation(self, job_id: str, number: int, evaluation: EvaluationCreate) -> None:
        """Site: report how round ``number``'s published model scores on local validation data."""
        self.request("POST", f"/v1/jobs/{job_id}/rounds/{number}/evaluations", json=evaluation.model_dump())
