"""Settings of the ``fedhe`` client commands: credentials and TLS, from ``FEDHE_*`` variables.

Credentials are never flags, so they stay out of shell history and process listings. Each
service has its own: the keyserver's admin token is not the aggregator's.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedhe.settings import resolve_secret
from fedhe.tls import ClientTLS, TLSSettingNames


class CliSettings(BaseSettings):
    """What the client commands read from the environment."""

    model_config = SettingsConfigDict(env_prefix="FEDHE_", extra="ignore")

    aggregator_token: SecretStr | None = None
    aggregator_token_file: Path | None = None
    keyserver_token: SecretStr | None = None
    keyserver_token_file: Path | None = None
    ca_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    insecure_http: bool = False

    def token(self, service: str) -> str:
        """The caller's token at ``service`` (``aggregator`` or ``keyserver``)."""
        value = getattr(self, f"{service}_token")
        file = getattr(self, f"{service}_token_file")
        return resolve_secret(value, file, f"FEDHE_{service.upper()}_TOKEN").get_secret_value()

    def tls(self) -> ClientTLS:
        """How the commands verify the services (and present a client certificate for mutual TLS)."""
        return ClientTLS(
            ca_file=self.ca_file,
            cert_file=self.client_cert_file,
            key_file=self.client_key_file,
            insecure_http=self.insecure_http,
            names=TLSSettingNames("FEDHE_CA_FILE", "FEDHE_CLIENT_CERT_FILE", "FEDHE_CLIENT_KEY_FILE"),
        )
