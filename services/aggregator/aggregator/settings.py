"""Aggregator settings: every field is read from ``FEDHE_AGGREGATOR_<FIELD>``."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from fedhe.settings import ServiceSettings


class AggregatorSettings(ServiceSettings):
    """Configuration of one aggregator process."""

    model_config = SettingsConfigDict(env_prefix="FEDHE_AGGREGATOR_", extra="ignore")

    port: int = 8080
    database_url: str = "sqlite:///./fedhe-aggregator.db"
    redis_url: str | None = None
    keyserver_url: str = "http://127.0.0.1:8090"
    max_upload_bytes: int = 256 * 1024 * 1024
    deadline_check_interval_s: float = 1.0
