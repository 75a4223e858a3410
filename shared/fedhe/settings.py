"""Settings conventions shared by the services' own settings classes.

Each service declares one ``BaseSettings`` subclass in its own package (``keyserver.settings``,
``aggregator.settings``, ``client_agent.settings``). They share these rules: every field can be
set by an environment variable ``FEDHE_<SERVICE>_<FIELD>``; secrets are ``SecretStr`` with no
default (never printed, never in the repository); a secret may instead be read from a file
named by ``..._FILE``, the usual way Kubernetes mounts Secrets.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings

from fedhe.errors import InvalidRequest


def resolve_secret(value: SecretStr | None, file: Path | None, name: str) -> SecretStr:
    """The secret given directly or in a file; it is an error to give neither or both."""
    if value is not None and file is not None:
        raise InvalidRequest(f"give {name} or {name}_file, not both")
    if file is not None:
        text = file.read_text(encoding="utf-8").strip()
        if not text:
            raise InvalidRequest(f"{name}_file {file} is empty")
        return SecretStr(text)
    if value is None or not value.get_secret_value():
        raise InvalidRequest(f"{name} is required (set it directly or through {name}_file)")
    return value


class ServiceSettings(BaseSettings):
    """Fields every service has: where it listens, its database, its two credentials, logging."""

    host: str = "127.0.0.1"
    port: int
    database_url: str
    operator_token: SecretStr | None = None
    operator_token_file: Path | None = None
    service_token: SecretStr | None = None
    service_token_file: Path | None = None
    migrate_on_start: bool = True
    log_level: str = "INFO"

    def operator_secret(self) -> SecretStr:
        """The operator credential."""
        return resolve_secret(self.operator_token, self.operator_token_file, "operator_token")

    def service_secret(self) -> SecretStr:
        """The token the keyserver and the aggregator use to authenticate to each other."""
        return resolve_secret(self.service_token, self.service_token_file, "service_token")
