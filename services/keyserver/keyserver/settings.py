"""Keyserver settings: every field is read from ``FEDHE_KEYSERVER_<FIELD>``."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedhe.settings import resolve_secret


class KeyserverSettings(BaseSettings):
    """Configuration of one keyserver process."""

    model_config = SettingsConfigDict(env_prefix="FEDHE_KEYSERVER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8090
    database_url: str = "sqlite:///./fedhe-keyserver.db"
    aggregator_url: str = "http://127.0.0.1:8080"
    kek: SecretStr | None = None
    kek_file: Path | None = None
    operator_token: SecretStr | None = None
    operator_token_file: Path | None = None
    service_token: SecretStr | None = None
    service_token_file: Path | None = None
    key_release_max_skew_s: int = 300
    migrate_on_start: bool = True
    log_level: str = "INFO"

    def operator_secret(self) -> SecretStr:
        """The operator credential."""
        return resolve_secret(self.operator_token, self.operator_token_file, "operator_token")

    def service_secret(self) -> SecretStr:
        """The token the keyserver and the aggregator use to authenticate to each other."""
        return resolve_secret(self.service_token, self.service_token_file, "service_token")

    def kek_secret(self) -> SecretStr:
        """The key-encryption key (base64 of 32 bytes) that protects stored secret contexts."""
        return resolve_secret(self.kek, self.kek_file, "kek")
