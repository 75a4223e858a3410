"""The command every service contributes: ``fedhe <service> [serve|migrate|check]``."""

from __future__ import annotations

import argparse
import ssl
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI

from fedhe.logs import configure_logging
from fedhe.migrations import upgrade
from fedhe.serving import serve
from fedhe.settings import ServiceSettings

S = TypeVar("S", bound=ServiceSettings)


def check_health(settings: ServiceSettings) -> int:
    """Exit 0 if this service answers ``/healthz`` on loopback (container health checks and probes).

    It checks that the process is alive, not who it is: the server's certificate names the
    service's public host, not 127.0.0.1, so it is not verified here. Under mutual TLS the
    service's own certificate is presented.
    """
    tls = settings.client_tls()
    scheme = "http" if settings.insecure_http else "https"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    try:
        response = httpx.get(f"{scheme}://127.0.0.1:{settings.port}/healthz", verify=context, timeout=4)
    except httpx.TransportError:
        return 1
    return 0 if response.status_code == 200 else 1


def add_service_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    settings_class: type[S],
    scripts: ModuleType,
    create_app: Callable[[S], FastAPI],
) -> argparse.ArgumentParser:
    """``fedhe NAME [serve|migrate]``; ``--host``, ``--port``, ``--database-url`` win over the environment."""
    default_port = settings_class.model_fields["port"].default

    def run(args: argparse.Namespace) -> int | None:
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
        elif args.action == "check":
            return check_health(settings)
        else:
            serve(create_app(settings), settings)
        return None

    parser = sub.add_parser(name, help=f"run the {name} or migrate its database (settings from FEDHE_{name.upper()}_*)")
    parser.add_argument("action", nargs="?", choices=["serve", "migrate", "check"], default="serve")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int, help=f"listen port (default {default_port})")
    parser.add_argument("--database-url", dest="database_url")
    parser.add_argument("--revision", default="head", help="migrate: the schema revision to reach")
    parser.set_defaults(func=run)
    return parser
