"""Alembic environment of the keyserver's database."""

from alembic import context

from fedhe.migrations import run_environment
from keyserver.tables import KeyserverBase

run_environment(context, KeyserverBase.metadata, "keyserver")
