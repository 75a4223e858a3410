"""What went wrong when a service could not be reached, in words that say what to change.

httpx reports every failure to connect as ``ConnectError``; the cause it wraps (an untrusted
certificate, a name mismatch, a refused connection, a port that does not speak TLS) tells a site
admin what to fix, so each becomes an ``UpstreamUnavailable`` with its own ``code``, naming the
CA file and the setting that chose it where that is the likely fix.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509

from fedhe.errors import UpstreamUnavailable
from fedhe.tls import ClientTLS

# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH: the certificate names other hosts than the URL's.
_HOSTNAME_MISMATCH = 62


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it was raised from or while handling."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _first(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    return next((cause for cause in _causes(exc) if isinstance(cause, kind)), None)


def _not_a_ca(ca_file: Path) -> bool:
    """``ca_file``'s first certificate is not a CA (a server's own certificate given as the CA, say)."""
    try:
        certificate = x509.load_pem_x509_certificate(ca_file.read_bytes())
        return not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (ValueError, OSError, x509.ExtensionNotFound):
        return False


def _untrusted(where: str, tls: ClientTLS, detail: str) -> UpstreamUnavailable:
    names = tls.names
    if tls.ca_file is None:
        fix = (
            f"{names.ca_file} is not set, so only the system's CAs are trusted: set it to the CA that signed the "
            "server's certificate"
        )
    elif _not_a_ca(tls.ca_file):
        fix = (
            f"{names.ca_file}={tls.ca_file} holds a certificate that is not a CA (a server's own certificate?): "
            "set it to the CA's certificate (fedhe dev-ca writes ca.pem)"
        )
    else:
        fix = f"the CA in {names.ca_file}={tls.ca_file} did not sign it: set {names.ca_file} to the CA that did"
    message = f"{where}: the server's certificate is not trusted ({detail}); {fix}"
    return UpstreamUnavailable(message, code="tls_untrusted")


@dataclass(frozen=True)
class _Call:
    """The failed call: what was asked of which service, and the setting that gave its URL."""

    where: str
    url: httpx.URL
    host: str
    tls_name: str
    service: str
    url_setting: str


def _tls_failure(call: _Call, exc: BaseException, tls: ClientTLS) -> UpstreamUnavailable | None:
    verify = _first(exc, ssl.SSLCertVerificationError)
    if isinstance(verify, ssl.SSLCertVerificationError):
        if verify.verify_code == _HOSTNAME_MISMATCH:
            return UpstreamUnavailable(
                f"{call.where}: the server's certificate does not name {call.tls_name!r}; use the host name its "
                f"certificate was issued for in {call.url_setting}, or reissue the certificate for "
                f"{call.tls_name} (fedhe dev-ca --host)",
                code="tls_name_mismatch",
            )
        return _untrusted(call.where, tls, verify.verify_message or str(verify))
    failed = _first(exc, ssl.SSLError)
    if not isinstance(failed, ssl.SSLError):
        return None
    reason = failed.reason or str(failed)
    if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "UNEXPECTED_EOF_WHILE_READING"):
        return UpstreamUnavailable(
            f"{call.where}: {call.host} does not answer in TLS ({reason}); is {call.url_setting} the "
            f"{call.service}'s HTTPS port?",
            code="not_tls",
        )
    if "ALERT" in reason:
        return UpstreamUnavailable(
            f"{call.where}: the server refused this client's TLS handshake ({reason}); if it requires a client "
            f"certificate, set {tls.names.cert_file} and {tls.names.key_file} to one its client CA signed",
            code="tls_client_refused",
        )
    return UpstreamUnavailable(f"{call.where}: TLS failed ({reason})", code="tls_failed")


def _network_failure(call: _Call, exc: httpx.TransportError) -> UpstreamUnavailable:
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamUnavailable(
            f"{call.where}: {call.host} did not answer in time ({type(exc).__name__}); is the {call.service} "
            "running and reachable from here (firewall, proxy)?",
            code="timeout",
        )
    if _first(exc, ConnectionRefusedError) is not None:
        return UpstreamUnavailable(
            f"{call.where}: nothing accepts connections on {call.host} (connection refused); is the "
            f"{call.service} running, and is {call.url_setting} its address and port?",
            code="connection_refused",
        )
    if _first(exc, socket.gaierror) is not None:
        return UpstreamUnavailable(
            f"{call.where}: the host name {call.url.host!r} does not resolve; check {call.url_setting}",
            code="host_not_found",
        )
    return UpstreamUnavailable(f"{call.where}: {type(exc).__name__}: {exc}", code="upstream_unavailable")


def explain_transport_error(
    exc: httpx.TransportError, method: str, url: httpx.URL, tls: ClientTLS, service: str, url_setting: str
) -> UpstreamUnavailable:
    """The failure of ``method url`` (a call to ``service``) as an error that names its cause and fix."""
    port = url.port or (443 if url.scheme == "https" else 80)
    # The name TLS checked: the URL's host, unless the request named another (httpx's sni_hostname).
    tls_name = str(exc.request.extensions.get("sni_hostname") or url.host)
    call = _Call(f"{method} {url} failed", url, f"{url.host}:{port}", tls_name, service, url_setting)
    return _tls_failure(call, exc, tls) or _network_failure(call, exc)


def wrong_service(
    method: str, url: httpx.URL, answered_by: str | None, service: str, url_setting: str
) -> UpstreamUnavailable:
    """A call meant for ``service`` answered by another fedhe service (or by something else)."""
    other = f"the {answered_by}" if answered_by else "not a fedhe service"
    return UpstreamUnavailable(
        f"{method} {url}: {url.scheme}://{url.host}:{url.port} is {other}, not the {service}; check {url_setting}",
        code="wrong_service",
    )
