"""Schema migrations (Alembic) for the keyserver's and the aggregator's databases.

Each service keeps its migration scripts in its own package (``<service>/migrations``) and its
own version table. ``upgrade`` is what ``fedhe db upgrade`` and service start-up run; on
Postgres it holds an advisory lock, so replicas starting together migrate once.
"""

from __future__ import annotations

import importlib
import zlib
from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData, text

from fedhe.db import make_engine

Service = Literal["aggregator", "keyserver"]


def version_table(service: Service) -> str:
    """The Alembic version table of ``service``."""
    return f"fedhe_{service}_version"


def alembic_config(service: Service) -> Config:
    """An Alembic configuration pointing at ``service``'s migration scripts."""
    scripts = importlib.import_module(f"{service}.migrations")
    config = Config()
    config.set_main_option("script_location", str(Path(str(scripts.__file__)).parent))
    return config


def upgrade(database_url: str, service: Service, revision: str = "head") -> None:
    """Bring ``service``'s schema at ``database_url`` up to ``revision``."""
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                lock_id = zlib.crc32(f"fedhe-migrate-{service}".encode())
                connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": lock_id})
            config = alembic_config(service)
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def run_environment(context: Any, metadata: MetaData, service: Service) -> None:
    """The body of a service's ``migrations/env.py`` (online mode, on a given connection)."""
    connection = context.config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=version_table(service),
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
