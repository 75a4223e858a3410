"""Errors cross the wire as the same classes: the client rebuilds them from status and body."""

from __future__ import annotations

import httpx
import pytest

from fedhe.api_client import KeyserverClient
from fedhe.errors import Conflict, InvalidRequest, PayloadTooLarge, UpstreamUnavailable, error_from_body


def test_server_failures_map_to_a_retryable_error() -> None:
    assert isinstance(error_from_body(500, None), UpstreamUnavailable)
    assert isinstance(error_from_body(502, {"error": {"code": "bad_gateway", "message": "x"}}), UpstreamUnavailable)


def test_client_errors_keep_their_class_code_and_detail() -> None:
    conflict = error_from_body(409, {"error": {"code": "wrong_round", "message": "m", "detail": {"current_round": 2}}})
    assert isinstance(conflict, Conflict)
    assert (conflict.code, conflict.message, conflict.detail) == ("wrong_round", "m", {"current_round": 2})
    refused = error_from_body(400, {"error": {"code": "invalid_ciphertext", "message": "chunk 0"}})
    assert isinstance(refused, InvalidRequest)
    assert refused.code == "invalid_ciphertext"
    assert isinstance(error_from_body(413, None), PayloadTooLarge)


def test_a_body_that_does_not_validate_is_refused_naming_the_call_and_the_model() -> None:
    federation_id = "fed-0123456789abcdef"

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"id": federation_id, "name": "missing keys"})

    with KeyserverClient("https://keys.example", "token", transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(
            InvalidRequest,
            match=rf"^GET /v1/federations/{federation_id} answered a body that is not a valid FederationPublic$",
        ) as one:
            client.federation(federation_id)
        with pytest.raises(
            InvalidRequest, match=r"^GET /v1/federations answered a body that is not a list of FederationPublic$"
        ) as listed:
            client.federations()
    assert one.value.code == listed.value.code == "invalid_response"
