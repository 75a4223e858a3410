"""Keyserver settings: every field is read from ``FEDHE_KEYSERVER_<FIELD>``."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from fedhe.settings import ServiceSettings, resolve_secret


class KeyserverSettings(ServiceSettings):
    """Configuration of one keyserver process."""

    model_config = SettingsConfigDict(env_prefix="FEDHE_KEYSERVER_", extra="ignore")

    port: int = 8090
    database_url: str = "sqlite:///./fedhe-keyserver.db"
    aggregator_url: str = "http://127.0.0.1:8080"
    kek: SecretStr | None = None
    kek_file: Path | None = None
    key_release_max_skew_s: int = 300

    def kek_secret(self) -> SecretStr:
        """The key-encryption key (base64 of 32 bytes) that protects stored secret contexts."""
        return resolve_secret(self.kek, self.kek_file, "kek")
