"""Alembic environment of the aggregator's database."""

from alembic import context

from aggregator.tables import AggregatorBase
from fedhe.migrations import run_environment

run_environment(context, AggregatorBase.metadata, "aggregator")
