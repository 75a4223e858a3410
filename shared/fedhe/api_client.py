"""HTTP clients for the keyserver and the aggregator (httpx), with errors mapped back.

A non-2xx answer becomes the same ``fedhe.errors`` class the service raised; a transport
failure becomes ``UpstreamUnavailable``. Callers therefore handle one hierarchy whether the
problem happened here or on the other side of the wire.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from fedhe.connection_errors import explain_transport_error, wrong_service
from fedhe.errors import InvalidRequest, error_from_body
from fedhe.identifiers import ACCOUNT_NAME, FEDERATION_ID, JOB_ID, KEY_ID, SHA256, SITE_ID, TOKEN_ID, checked
from fedhe.logs import REQUEST_ID_HEADER, SERVICE_HEADER, current_request_id, new_request_id
from fedhe.schemas import (
    AccountCreate,
    AccountPublic,
    AuditEventPublic,
    ContextInfo,
    DeclineCreate,
    EndorsementCreate,
    EvaluationCreate,
    FederationCreate,
    FederationKeys,
    FederationOverview,
    FederationPublic,
    HeartbeatCreate,
    InitialWeightsPublic,
    JobCreate,
    JobPublic,
    KeyReleaseRequest,
    MemberCreate,
    MemberPublic,
    PinnedKeysRequest,
    RoundPublic,
    RoundVerification,
    SiteApproved,
    SiteCreate,
    SitePublic,
    TokenCreate,
    TokenIssued,
    TokenPublic,
    UpdateAccepted,
    WhoAmI,
)
from fedhe.secagg.messages import AdvertisementCreate, Transcript, UnmaskingAnswer
from fedhe.tls import ClientTLS

M = TypeVar("M", bound=BaseModel)

_ID_PATTERNS = {
    "job_id": JOB_ID,
    "site_id": SITE_ID,
    "candidate": SITE_ID,
    "federation_id": FEDERATION_ID,
    "key_id": KEY_ID,
    "token_id": TOKEN_ID,
    "account": ACCOUNT_NAME,
    "name": ACCOUNT_NAME,
    "sha256": SHA256,
}


def _raise_for_status(response: httpx.Response) -> None:
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = None
        raise error_from_body(response.status_code, body)


def _carry_request_id(request: httpx.Request) -> None:
    """Send the id of the request being served (or of the agent's current round) on to the next service."""
    request.headers[REQUEST_ID_HEADER] = current_request_id() or new_request_id()


def _invalid_response(response: httpx.Response, expected: str) -> InvalidRequest:
    return InvalidRequest(
        f"{response.request.method} {response.request.url.path} answered a body that is not {expected}",
        code="invalid_response",
    )


class ServiceClient:
    """A base URL, a bearer token, TLS and error mapping around ``httpx.Client``.

    The URL must be ``https://`` unless ``tls.insecure_http`` was chosen; the server is verified
    against ``tls.ca_file`` (or the system's CAs), and ``tls``'s certificate is presented when the
    server asks for one (mutual TLS). A failure to connect names its cause and the setting to
    change (``url_setting`` names the one that gave ``base_url``), and an answer from another
    service than ``service`` is refused as such.
    """

    service: ClassVar[str] = "service"

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        tls: ClientTLS | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
        url_setting: str | None = None,
    ):
        tls = tls or ClientTLS()
        tls.check_url(base_url)
        self._tls = tls
        self._url_setting = url_setting or f"the {self.service} URL"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=base_url,
            headers=headers,
            timeout=timeout,
            transport=transport,
            verify=tls.ssl_context(),
            event_hooks={"request": [_carry_request_id]},
        )

    def close(self) -> None:
        """Release the connection pool."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _url(template: str, **ids: str | int) -> str:
        """A route path with each identifier checked against its pattern before it goes in the URL."""
        values: dict[str, str] = {}
        for name, value in ids.items():
            if isinstance(value, int) and not isinstance(value, bool):
                values[name] = str(value)
            else:
                values[name] = checked(_ID_PATTERNS[name], value, name)
        return template.format(**values)

    @staticmethod
    def parse(model: type[M], response: httpx.Response) -> M:
        """The response body as ``model``; a body that does not validate is refused, not trusted."""
        try:
            return model.model_validate(response.json())
        except (ValueError, ValidationError) as exc:
            raise _invalid_response(response, f"a valid {model.__name__}") from exc

    def parse_list(self, model: type[M], response: httpx.Response) -> list[M]:
        """The response body as a list of ``model``."""
        try:
            items = response.json()
            if not isinstance(items, list):
                raise ValueError("not a list")
            return [model.model_validate(item) for item in items]
        except (ValueError, ValidationError) as exc:
            raise _invalid_response(response, f"a list of {model.__name__}") from exc

    def _transport_error(self, exc: httpx.TransportError, method: str, path: str) -> Exception:
        url = self._http.base_url.join(path)
        return explain_transport_error(exc, method, url, self._tls, self.service, self._url_setting)

    def _check_service(self, response: httpx.Response) -> None:
        """Refuse an answer from another service than the one this client talks to."""
        answered_by = response.headers.get(SERVICE_HEADER)
        if answered_by != self.service and (answered_by is not None or response.status_code == 404):
            request = response.request
            raise wrong_service(request.method, request.url, answered_by, self.service, self._url_setting)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request; raise the mapped ``FedheError`` on any failure."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._transport_error(exc, method, path) from exc
        self._check_service(response)
        _raise_for_status(response)
        return response

    def download(self, path: str, max_bytes: int) -> bytes:
        """GET a binary body, refused as soon as it runs past ``max_bytes`` (a peer cannot fill memory)."""
        body = bytearray()
        try:
            with self._http.stream("GET", path) as response:
                self._check_service(response)
                if response.status_code >= 400:
                    response.read()
                    _raise_for_status(response)
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        raise InvalidRequest(
                            f"GET {path} sent more than the {max_bytes} bytes expected", code="response_too_large"
                        )
        except httpx.TransportError as exc:
            raise self._transport_error(exc, "GET", path) from exc
        return bytes(body)

    def audit_events(self, limit: int = 100) -> list[AuditEventPublic]:
        """Admin or viewer: the newest audit events."""
        return self.parse_list(AuditEventPublic, self.request("GET", "/v1/audit", params={"limit": limit}))

    def whoami(self) -> WhoAmI:
        """The caller as the service sees it."""
        return self.parse(WhoAmI, self.request("GET", "/v1/whoami"))

    def accounts(self) -> list[AccountPublic]:
        """Admin: every account."""
        return self.parse_list(AccountPublic, self.request("GET", "/v1/accounts"))

    def create_account(self, request: AccountCreate) -> AccountPublic:
        """Admin: create a named account."""
        return self.parse(AccountPublic, self.request("POST", "/v1/accounts", json=request.model_dump()))

    def disable_account(self, name: str) -> AccountPublic:
        """Admin: disable an account and revoke its tokens."""
        return self.parse(AccountPublic, self.request("POST", self._url("/v1/accounts/{name}/disable", name=name)))

    def tokens(self, account: str) -> list[TokenPublic]:
        """An account's tokens (metadata)."""
        return self.parse_list(
            TokenPublic, self.request("GET", self._url("/v1/accounts/{account}/tokens", account=account))
        )

    def issue_token(self, account: str, request: TokenCreate) -> TokenIssued:
        """A new token for an account, shown once."""
        response = self.request(
            "POST", self._url("/v1/accounts/{account}/tokens", account=account), json=request.model_dump()
        )
        return self.parse(TokenIssued, response)

    def revoke_token(self, token_id: str) -> TokenPublic:
        """Revoke a token."""
        return self.parse(
            TokenPublic, self.request("POST", self._url("/v1/tokens/{token_id}/revoke", token_id=token_id))
        )


class KeyserverClient(ServiceClient):
    """Typed calls to the keyserver."""

    service = "keyserver"

    def create_federation(self, request: FederationCreate) -> FederationPublic:
        """Keyserver admin: create a federation."""
        return self.parse(FederationPublic, self.request("POST", "/v1/federations", json=request.model_dump()))

    def rotate_key(self, federation_id: str) -> FederationPublic:
        """Keyserver admin: rotate a federation's key."""
        return self.parse(
            FederationPublic,
            self.request("POST", self._url("/v1/federations/{federation_id}/rotate", federation_id=federation_id)),
        )

    def federation(self, federation_id: str) -> FederationPublic:
        """Keyserver admin or viewer: one federation."""
        return self.parse(
            FederationPublic,
            self.request("GET", self._url("/v1/federations/{federation_id}", federation_id=federation_id)),
        )

    def federations(self) -> list[FederationPublic]:
        """Keyserver admin or viewer: every federation."""
        return self.parse_list(FederationPublic, self.request("GET", "/v1/federations"))

    def members(self, federation_id: str) -> list[MemberPublic]:
        """Keyserver admin, viewer or the aggregator's service identity: a federation's members."""
        response = self.request(
            "GET", self._url("/v1/federations/{federation_id}/members", federation_id=federation_id)
        )
        return self.parse_list(MemberPublic, response)

    def add_member(self, federation_id: str, request: MemberCreate) -> MemberPublic:
        """Keyserver admin: propose (or admit) a member, pinning its public key."""
        response = self.request(
            "POST",
            self._url("/v1/federations/{federation_id}/members", federation_id=federation_id),
            json=request.model_dump(),
        )
        return self.parse(MemberPublic, response)

    def revoke_member(self, federation_id: str, site_id: str) -> MemberPublic:
        """Keyserver admin: revoke a membership."""
        response = self.request(
            "POST",
            self._url(
                "/v1/federations/{federation_id}/members/{site_id}/revoke", federation_id=federation_id, site_id=site_id
            ),
        )
        return self.parse(MemberPublic, response)

    def endorse_member(self, federation_id: str, candidate: str, request: EndorsementCreate) -> MemberPublic:
        """An active member: endorse a proposed member's pinned key (signed, no bearer token)."""
        response = self.request(
            "POST",
            self._url(
                "/v1/federations/{federation_id}/members/{candidate}/endorsements",
                federation_id=federation_id,
                candidate=candidate,
            ),
            json=request.model_dump(),
        )
        return self.parse(MemberPublic, response)

    def context_info(self, key_id: str) -> ContextInfo:
        """Public facts about a context."""
        return self.parse(ContextInfo, self.request("GET", self._url("/v1/contexts/{key_id}", key_id=key_id)))

    def evaluation_context(self, key_id: str) -> bytes:
        """Aggregator: the keyless evaluation context."""
        return self.request("GET", self._url("/v1/contexts/{key_id}/evaluation", key_id=key_id)).content

    def pinned_keys(self, key_id: str, request: PinnedKeysRequest) -> FederationKeys:
        """Site: the pinned keys of its federation's active members, against a signed request."""
        response = self.request(
            "POST", self._url("/v1/contexts/{key_id}/members", key_id=key_id), json=request.model_dump()
        )
        return self.parse(FederationKeys, response)

    def secret_context(self, key_id: str, request: KeyReleaseRequest) -> bytes:
        """Site: the secret context, against a signed request."""
        return self.request(
            "POST", self._url("/v1/contexts/{key_id}/secret", key_id=key_id), json=request.model_dump()
        ).content


class AggregatorClient(ServiceClient):
    """Typed calls to the aggregator."""

    service = "aggregator"

    def register_site(self, request: SiteCreate) -> SitePublic:
        """Site admin: register (no credential needed)."""
        return self.parse(SitePublic, self.request("POST", "/v1/sites", json=request.model_dump()))

    def federations(self) -> list[FederationOverview]:
        """Admin or viewer: federations with jobs here, their members and jobs."""
        return self.parse_list(FederationOverview, self.request("GET", "/v1/federations"))

    def sites(self) -> list[SitePublic]:
        """Admin or viewer: all sites."""
        return self.parse_list(SitePublic, self.request("GET", "/v1/sites"))

    def site(self, site_id: str) -> SitePublic:
        """Admin or viewer: one site."""
        return self.parse(SitePublic, self.request("GET", self._url("/v1/sites/{site_id}", site_id=site_id)))

    def approve_site(self, site_id: str) -> SiteApproved:
        """Admin: approve a site; the answer holds its credential, shown once."""
        return self.parse(SiteApproved, self.request("POST", self._url("/v1/sites/{site_id}/approve", site_id=site_id)))

    def reject_site(self, site_id: str) -> SitePublic:
        """Admin: reject a pending site."""
        return self.parse(SitePublic, self.request("POST", self._url("/v1/sites/{site_id}/reject", site_id=site_id)))

    def revoke_site(self, site_id: str) -> SitePublic:
        """Admin: revoke an approved site."""
        return self.parse(SitePublic, self.request("POST", self._url("/v1/sites/{site_id}/revoke", site_id=site_id)))

    def create_job(self, request: JobCreate) -> JobPublic:
        """Admin: create a job; round 0 opens at once."""
        return self.parse(JobPublic, self.request("POST", "/v1/jobs", json=request.model_dump(mode="json")))

    def jobs(self) -> list[JobPublic]:
        """Admin, viewer, or a site (the jobs of its federations): jobs."""
        return self.parse_list(JobPublic, self.request("GET", "/v1/jobs"))

    def job(self, job_id: str) -> JobPublic:
        """Operator or site: one job."""
        return self.parse(JobPublic, self.request("GET", self._url("/v1/jobs/{job_id}", job_id=job_id)))

    def stop_job(self, job_id: str) -> JobPublic:
        """Admin: stop a running job."""
        return self.parse(JobPublic, self.request("POST", self._url("/v1/jobs/{job_id}/stop", job_id=job_id)))

    def rounds(self, job_id: str) -> list[RoundPublic]:
        """Operator or site: every round attempt of a job."""
        return self.parse_list(RoundPublic, self.request("GET", self._url("/v1/jobs/{job_id}/rounds", job_id=job_id)))

    def round(
        self, job_id: str, number: int, *, changed_from: RoundPublic | None = None, wait_s: float = 0
    ) -> RoundPublic:
        """Operator or site: the latest attempt of round ``number``; with ``changed_from``, as soon as its
        state or attempt differs from that one's (or after ``wait_s`` seconds)."""
        params: dict[str, str | int | float] = {}
        if changed_from is not None:
            params = {"after_state": changed_from.state.value, "after_attempt": changed_from.attempt, "wait_s": wait_s}
        path = self._url("/v1/jobs/{job_id}/rounds/{number}", job_id=job_id, number=number)
        return self.parse(RoundPublic, self.request("GET", path, params=params))

    def verify_round(self, job_id: str, number: int) -> RoundVerification:
        """Admin or viewer: rebuild a round's sum from its submissions and compare with the stored one."""
        return self.parse(
            RoundVerification,
            self.request("GET", self._url("/v1/jobs/{job_id}/rounds/{number}/verify", job_id=job_id, number=number)),
        )

    def aggregate(self, job_id: str, number: int) -> bytes:
        """Member site: the envelope holding round ``number``'s published encrypted sum."""
        return self.request(
            "GET", self._url("/v1/jobs/{job_id}/rounds/{number}/aggregate", job_id=job_id, number=number)
        ).content

    def upload_initial_weights(self, vector: bytes, sha256: str) -> InitialWeightsPublic:
        """Admin: store a job's given round-0 weights (flat float64 little-endian) under their sha256."""
        path = self._url("/v1/initial-weights/{sha256}", sha256=sha256)
        headers = {"Content-Type": "application/octet-stream"}
        return self.parse(InitialWeightsPublic, self.request("PUT", path, content=vector, headers=headers))

    def initial_weights(self, sha256: str, num_values: int) -> bytes:
        """Member site or operator: the stored round-0 weights named ``sha256``, at most ``num_values`` values."""
        return self.download(self._url("/v1/initial-weights/{sha256}", sha256=sha256), max_bytes=8 * num_values)

    def upload_update(
        self, job_id: str, number: int, envelope: bytes, idempotency_key: str | None = None
    ) -> UpdateAccepted:
        """Site: upload an encrypted update for round ``number`` (safe to retry with the same bytes)."""
        headers = {"Content-Type": "application/octet-stream"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        response = self.request(
            "POST",
            self._url("/v1/jobs/{job_id}/rounds/{number}/updates", job_id=job_id, number=number),
            content=envelope,
            headers=headers,
        )
        return self.parse(UpdateAccepted, response)

    def advertise_key(self, job_id: str, number: int, advertisement: AdvertisementCreate) -> None:
        """Site: advertise its X25519 key for the current attempt of a secure round."""
        self.request(
            "POST",
            self._url("/v1/jobs/{job_id}/rounds/{number}/keys", job_id=job_id, number=number),
            json=advertisement.model_dump(),
        )

    def transcript(self, job_id: str, number: int, attempt: int | None = None) -> Transcript:
        """Site or operator: a secure round attempt's roster, signed statements and seeds."""
        params = {} if attempt is None else {"attempt": attempt}
        response = self.request(
            "GET",
            self._url("/v1/jobs/{job_id}/rounds/{number}/transcript", job_id=job_id, number=number),
            params=params,
        )
        return self.parse(Transcript, response)

    def answer_unmasking(self, job_id: str, number: int, answer: UnmaskingAnswer) -> None:
        """Site: send the shares it holds of the other roster members' self-mask seeds."""
        self.request(
            "POST",
            self._url("/v1/jobs/{job_id}/rounds/{number}/unmasking", job_id=job_id, number=number),
            json=answer.model_dump(),
        )

    def heartbeat(self, report: HeartbeatCreate) -> None:
        """Site: report the agent's state, versions and privacy spending."""
        self.request("POST", "/v1/sites/me/heartbeat", json=report.model_dump(mode="json"))

    def decline_round(self, job_id: str, number: int, decline: DeclineCreate) -> None:
        """Site: say it will not upload to round ``number``, and why."""
        self.request(
            "POST",
            self._url("/v1/jobs/{job_id}/rounds/{number}/declines", job_id=job_id, number=number),
            json=decline.model_dump(mode="json"),
        )

    def post_evaluation(self, job_id: str, number: int, evaluation: EvaluationCreate) -> None:
        """Site: report how round ``number``'s published model scores on local validation data."""
        self.request(
            "POST",
            self._url("/v1/jobs/{job_id}/rounds/{number}/evaluations", job_id=job_id, number=number),
            json=evaluation.model_dump(),
        )
