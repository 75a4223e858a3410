"""The command every service contributes: ``fedhe <service> [serve|migrate]``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

from fastapi import FastAPI

from fedhe.logs import configure_logging
from fedhe.migrations import upgrade
from fedhe.serving import serve
from fedhe.settings import ServiceSettings

S = TypeVar("S", bound=ServiceSettings)


def add_service_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    settings_class: type[S],
    scripts: ModuleType,
    create_app: Callable[[S], FastAPI],
) -> argparse.ArgumentParser:
    """``fedhe NAME [serve|migrate]``; ``--host``, ``--port``, ``--database-url`` win over the environment."""
    default_port = settings_class.model_fields["port"].default

    def run(args: argparse.Namespace) -> None:
        given: dict[str, Any] = {
            field: getattr(args, field)
            for field in ("host", "port", "database_url")
            if getattr(args, field) is not None
        }
        settings = settings_class(**given)
        configure_logging(settings.log_level, name)
        if args.action == "migrate":
            upgrade(settings.database_url, name, scripts, args.revision)
            print(f"{name} database is at revision {args.revision}")
        else:
            serve(create_app(settings), settings)

    parser = sub.add_parser(name, help=f"run the {name} or migrate its database (settings from FEDHE_{name.upper()}_*)")
    parser.add_argument("action", nargs="?", choices=["serve", "migrate"], default="serve")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int, help=f"listen port (default {default_port})")
    parser.add_argument("--database-url", dest="database_url")
    parser.add_argument("--revision", default="head", help="migrate: the schema revision to reach")
    parser.set_defaults(func=run)
    return parser
