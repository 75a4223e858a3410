"""``fedhe keyserver``: serve the keyserver or migrate its database."""

from __future__ import annotations

import argparse

from fastapi import FastAPI

from fedhe.cli.service import add_service_command
from keyserver import migrations
from keyserver.settings import KeyserverSettings


def _create_app(settings: KeyserverSettings) -> FastAPI:
    from keyserver.app import create_app

    return create_app(settings)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Contribute ``fedhe keyserver`` to the command line."""
    add_service_command(sub, "keyserver", KeyserverSettings, migrations, _create_app)
