"""Aggregator settings: every field is read from ``FEDHE_AGGREGATOR_<FIELD>``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from fedhe.settings import ServiceSettings, resolve_secret


class AggregatorSettings(ServiceSettings):
    """Configuration of one aggregator process."""

    model_config = SettingsConfigDict(env_prefix="FEDHE_AGGREGATOR_", extra="ignore")

    port: int = 8080
    database_url: str = "sqlite:///./fedhe-aggregator.db"
    keyserver_url: str = "https://127.0.0.1:8090"
    keyserver_token: SecretStr | None = None
    keyserver_token_file: Path | None = None
    membership_cache_s: float = Field(default=10.0, ge=0, le=300)
    max_upload_bytes: int = 256 * 1024 * 1024
    max_initial_weights_bytes: int = Field(
        default=512 * 1024 * 1024, ge=8, description="largest given round-0 weights file (8 bytes per value)"
    )
    registrations_per_address: int = Field(default=20, ge=1, description="site registrations per hour per address")
    deadline_check_interval_s: float = 1.0
    sum_workers: int = Field(default=0, ge=0, description="processes summing a closed round; 0: one per CPU core")
    orphan_upload_after_s: float = Field(
        default=1800, gt=0, description="an upload that never counted is removed after this many seconds"
    )
    # Counted uploads are the encrypted record of every site's contribution; once their round is
    # finished, only `job verify` reads them. None keeps them as long as the database does.
    upload_retention_days: float | None = Field(default=None, ge=0)

    def keyserver_secret(self) -> SecretStr:
        """The aggregator's service credential at the keyserver (its ``aggregator`` service account)."""
        return resolve_secret(self.keyserver_token, self.keyserver_token_file, "keyserver_token")
