"""TLS for every fedhe connection: on by default, plain HTTP only behind an explicit, logged flag.

Servers present a certificate and key; with a client CA they also require and verify a client
certificate (mutual TLS). Clients verify the server against a configured CA bundle (or the
system's) and may present their own certificate. ``insecure_http`` turns all of this off for a
trial on one machine, and every process that runs with it says so loudly at start.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhe.errors import InvalidRequest

logger = logging.getLogger(__name__)

INSECURE_WARNING = (
    "PLAIN HTTP: insecure_http is set, so credentials, secret contexts and updates cross the network "
    "unencrypted. Use this only on one machine for a trial; never in a deployment."
)


@dataclass(frozen=True)
class ServerTLS:
    """A server's certificate and key, and the CA its clients' certificates must chain to (mTLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    @classmethod
    def from_settings(
        cls, *, cert: Path | None, key: Path | None, client_ca: Path | None, insecure_http: bool
    ) -> ServerTLS | None:
        """The server's TLS, or None with ``insecure_http``; missing files are a start-up error."""
        if insecure_http:
            logger.warning(INSECURE_WARNING)
            return None
        if cert is None or key is None:
            raise InvalidRequest(
                "TLS is on by default: set tls_cert_file and tls_key_file (fedhe dev-ca makes a local CA "
                "and certificates), or insecure_http=true for a plain-HTTP trial on one machine"
            )
        for path, setting in ((cert, "tls_cert_file"), (key, "tls_key_file"), (client_ca, "tls_client_ca_file")):
            _require_file(path, setting)
        return cls(cert_file=cert, key_file=key, client_ca_file=client_ca)

    def uvicorn_options(self) -> dict[str, Any]:
        """The keyword arguments that make uvicorn serve this TLS."""
        options: dict[str, Any] = {"ssl_certfile": str(self.cert_file), "ssl_keyfile": str(self.key_file)}
        if self.client_ca_file is not None:
            options |= {"ssl_ca_certs": str(self.client_ca_file), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return options


@dataclass(frozen=True)
class TLSSettingNames:
    """The variables (or flags) that set a client's TLS files, so an error can say what to change."""

    ca_file: str = "the CA file"
    cert_file: str = "the client certificate"
    key_file: str = "the client key"


@dataclass(frozen=True)
class ClientTLS:
    """How a client verifies the server and, for mutual TLS, which certificate it presents."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure_http: bool = False
    names: TLSSettingNames = TLSSettingNames()

    def check_url(self, url: str) -> None:
        """Refuse a plain-HTTP URL unless ``insecure_http`` was chosen."""
        if url.startswith("http://") and not self.insecure_http:
            raise InvalidRequest(
                f"{url} is plain HTTP; use https:// (or set insecure_http for a trial on one machine)",
                code="insecure_url",
            )
        if not url.startswith(("http://", "https://")):
            raise InvalidRequest(f"{url} is not an http(s) URL", code="invalid_url")

    def ssl_context(self) -> ssl.SSLContext:
        """A client context verifying against the configured CA (or the system's), with our certificate.

        A file that is missing or not PEM is refused naming the file and the setting that named it.
        """
        for path, name in ((self.ca_file, self.names.ca_file), (self.cert_file, self.names.cert_file)):
            _require_file(path, name)
        _require_file(self.key_file, self.names.key_file)
        try:
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        except ssl.SSLError as exc:
            raise InvalidRequest(
                f"{self.names.ca_file}={self.ca_file} holds no PEM certificate ({exc.reason}): give the CA's "
                "certificate file (fedhe dev-ca writes ca.pem)",
                code="tls_file_invalid",
            ) from exc
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None and self.key_file is not None:
            try:
                context.load_cert_chain(str(self.cert_file), str(self.key_file))
            except ssl.SSLError as exc:
                raise InvalidRequest(
                    f"{self.names.cert_file}={self.cert_file} and {self.names.key_file}={self.key_file} are not a "
                    f"PEM certificate and its key ({exc.reason})",
                    code="tls_file_invalid",
                ) from exc
        return context


def _require_file(path: Path | None, setting: str) -> None:
    if path is not None and not path.is_file():
        raise InvalidRequest(f"{setting}={path}: no such file", code="tls_file_missing")
