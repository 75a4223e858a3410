"""Errors cross the wire as the same classes: the client rebuilds them from status and body."""

from __future__ import annotations

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
