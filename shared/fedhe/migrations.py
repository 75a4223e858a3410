"""Schema migrations (Alembic) for a service's database.

Each service keeps its migration scripts in its own package (``<service>/migrations``) and
its own version table, and hands that package to ``upgrade``: the common package never imports
a service. ``upgrade`` is what ``fedhe <service> migrate`` and service start-up run; on
Postgres it holds an advisory lock, so replicas starting together migrate once.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from types import ModuleType
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData, text

from fedhe.db import make_engine


def version_table(service: str) -> str:
    """The Alembic version table of ``service``."""
    return f"fedhe_{service}_version"


def alembic_config(scripts: ModuleType) -> Config:
    """An Alembic configuration pointing at the migration scripts in package ``scripts``."""
    config = Config()
    config.set_main_option("script_location", str(Path(str(scripts.__file__)).parent))
    return config


def upgrade(database_url: str, service: str, scripts: ModuleType, revision: str = "head") -> None:
    """Bring ``service``'s schema at ``database_url`` up to ``revision`` with the scripts in ``scripts``."""
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                lock_id = zlib.crc32(f"fedhe-migrate-{service}".encode())
                connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": lock_id})
            config = alembic_config(scripts)
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def run_environment(context: Any, metadata: MetaData, service: str) -> None:
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
