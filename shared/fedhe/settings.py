"""Settings conventions shared by the services' own settings classes.

Each service declares one ``BaseSettings`` subclass in its own package (``keyserver.settings``,
``aggregator.settings``, ``client_agent.settings``). They share these rules: every field can be
set by an environment variable ``FEDHE_<SERVICE>_<FIELD>``; secrets are ``SecretStr`` with no
default (never printed, never in the repository); a secret may instead be read from a file
named by ``..._FILE``, the usual way Kubernetes mounts Secrets. The one table of every setting
is docs/configuration.md.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings

from fedhe.errors import InvalidRequest
from fedhe.tls import ClientTLS, ServerTLS, TLSSettingNames


def resolve_secret(value: SecretStr | None, file: Path | None, name: str) -> SecretStr:
    """The secret given directly or in a file; it is an error to give neither or both."""
    found = optional_secret(value, file, name)
    if found is None:
        raise InvalidRequest(f"{name} is required (set it directly or through {name}_file)")
    return found


def optional_secret(value: SecretStr | None, file: Path | None, name: str) -> SecretStr | None:
    """The secret given directly or in a file, or None when neither is set; both is an error."""
    if value is not None and file is not None:
        raise InvalidRequest(f"give {name} or {name}_file, not both")
    file_setting = f"{name}_file" if name.islower() else f"{name}_FILE"
    if file is not None:
        if not file.is_file():
            raise InvalidRequest(f"{file_setting} {file}: no such file", code="file_missing")
        text = file.read_text(encoding="utf-8").strip()
        if not text:
            raise InvalidRequest(f"{file_setting} {file} is empty")
        return SecretStr(text)
    if value is not None and not value.get_secret_value():
        raise InvalidRequest(f"{name} is set but empty")
    return value


class ServiceSettings(BaseSettings):
    """Fields every service has: where it listens, TLS, its database, limits, first admin, logging."""

    host: str = "127.0.0.1"
    port: int
    database_url: str
    redis_url: str | None = None
    # Deployments that share one Redis keep apart by prefix (within one, the keyserver's and the
    # aggregator's keys never overlap).
    redis_key_prefix: str = Field(default="fedhe", pattern=r"^[a-z0-9][a-z0-9.-]{0,127}$")
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    tls_ca_file: Path | None = None
    insecure_http: bool = False
    bootstrap_admin: str = "bootstrap-admin"
    bootstrap_admin_token: SecretStr | None = None
    bootstrap_admin_token_file: Path | None = None
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    rate_limit_per_address: int = Field(default=1200, ge=1, description="requests per minute per client address")
    rate_limit_per_credential: int = Field(default=1200, ge=1, description="requests per minute per credential")
    auth_failures_per_address: int = Field(default=30, ge=1, description="failed authentications per minute")
    hsts_max_age_s: int = Field(
        default=31_536_000, ge=0, description="Strict-Transport-Security max-age on HTTPS answers; 0 sends none"
    )
    refusal_audits_per_minute: int = Field(
        default=20, ge=1, description="audit rows of refused requests per minute per actor (or address) and action"
    )
    migrate_on_start: bool = True
    log_level: str = "INFO"

    def bootstrap_admin_secret(self) -> SecretStr | None:
        """The installer-provided token of the first admin account, if any."""
        return optional_secret(self.bootstrap_admin_token, self.bootstrap_admin_token_file, "bootstrap_admin_token")

    def server_tls(self) -> ServerTLS | None:
        """How this service serves TLS; None only with ``insecure_http`` (plain HTTP, for trials)."""
        return ServerTLS.from_settings(
            cert=self.tls_cert_file,
            key=self.tls_key_file,
            client_ca=self.tls_client_ca_file,
            insecure_http=self.insecure_http,
        )

    def client_tls(self) -> ClientTLS:
        """How this service verifies the services it calls (and presents its certificate for mutual TLS)."""
        return ClientTLS(
            ca_file=self.tls_ca_file,
            cert_file=self.tls_cert_file,
            key_file=self.tls_key_file,
            insecure_http=self.insecure_http,
            names=TLSSettingNames(*(self.variable(f"tls_{name}_file") for name in ("ca", "cert", "key"))),
        )

    def variable(self, field: str) -> str:
        """The environment variable that sets ``field``."""
        return f"{self.model_config.get('env_prefix', '')}{field}".upper()
