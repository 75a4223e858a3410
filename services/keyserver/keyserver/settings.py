"""Keyserver settings: every field is read from ``FEDHE_KEYSERVER_<FIELD>``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from fedhe.settings import ServiceSettings, optional_secret, resolve_secret


class KeyserverSettings(ServiceSettings):
    """Configuration of one keyserver process."""

    model_config = SettingsConfigDict(env_prefix="FEDHE_KEYSERVER_", extra="ignore")

    port: int = 8090
    database_url: str = "sqlite:///./fedhe-keyserver.db"
    public_url: str | None = Field(
        default=None, description="the URL sites use to reach this keyserver; signed requests name it as audience"
    )
    kek: SecretStr | None = None
    kek_file: Path | None = None
    aggregator_token: SecretStr | None = None
    aggregator_token_file: Path | None = None
    key_release_max_skew_s: int = Field(default=120, ge=10, le=900)
    key_releases_per_site: int = Field(default=30, ge=1, description="signed requests per minute per site")

    def kek_secret(self) -> SecretStr:
        """The key-encryption key (base64 of 32 bytes) that protects stored secret contexts."""
        return resolve_secret(self.kek, self.kek_file, "kek")

    def aggregator_secret(self) -> SecretStr | None:
        """The aggregator's service credential, registered as the ``aggregator`` service account."""
        return optional_secret(self.aggregator_token, self.aggregator_token_file, "aggregator_token")

    def audience(self) -> str:
        """What signed requests must name as their audience: this keyserver's public URL."""
        if self.public_url:
            return self.public_url.rstrip("/")
        scheme = "http" if self.insecure_http else "https"
        return f"{scheme}://{self.host}:{self.port}"
