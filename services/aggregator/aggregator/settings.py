"""Aggregator settings: every field is read from ``FEDHE_AGGREGATOR_<FIELD>``."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedhe.settings import resolve_secret


class AggregatorSettings(BaseSettings):
    """Configuration of one aggregator process."""

    model_config = SettingsConfigDict(env_prefix="FEDHE_AGGREGATOR_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8080
    database_url: str = "sqlite:///./fedhe-aggregator.db"
    redis_url: str | None = None
    keyserver_url: str = "http://127.0.0.1:8090"
    operator_token: SecretStr | None = None
    operator_token_file: Path | None = None
    service_token: SecretStr | None = None
    service_token_file: Path | None = None
    max_upload_bytes: int = 256 * 1024 * 1024
    deadline_check_interval_s: float = 1.0
    migrate_on_start: bool = True
    log_level: str = "INFO"

    def operator_secret(self) -> SecretStr:
        """The operator credential."""
        return resolve_secret(self.operator_token, self.operator_token_file, "operator_token")

    def service_secret(self) -> SecretStr:
        """The token the keyserver and the aggregator use to authenticate to each other."""
        return resolve_secret(self.service_token, self.service_token_file, "service_token")
