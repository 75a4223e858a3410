"""``fedhe aggregator``: serve the aggregator or migrate its database."""

from __future__ import annotations

import argparse

from fastapi import FastAPI

from aggregator import migrations
from aggregator.settings import AggregatorSettings
from fedhe.cli.service import add_service_command


def _create_app(settings: AggregatorSettings) -> FastAPI:
    from aggregator.app import create_app

    return create_app(settings)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Contribute ``fedhe aggregator`` to the command line."""
    add_service_command(sub, "aggregator", AggregatorSettings, migrations, _create_app)
