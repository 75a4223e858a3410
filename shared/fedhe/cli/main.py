"""Parsing, dispatch and exit codes of the ``fedhe`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from pydantic import ValidationError

from fedhe.cli import devca, operator, privacy
from fedhe.errors import FedheError, InvalidRequest, UpstreamUnavailable

COMMANDS_GROUP = "fedhe.commands"
"""Entry-point group through which services contribute subcommands: ``register(subparsers)``."""

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_INVALID_INPUT = 2
EXIT_UNREACHABLE = 3

Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _contributed() -> list[Register]:
    found = sorted(entry_points(group=COMMANDS_GROUP), key=lambda ep: ep.name)
    return [ep.load() for ep in found]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with the common commands and every service's contribution."""
    parser = argparse.ArgumentParser(
        prog="fedhe", description="Privacy-preserving federated learning: run services and agents, manage federations."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in [operator.register, devca.register, privacy.register, *_contributed()]:
        register(sub)
    return parser


def _failure(exc: FedheError | ValidationError | OSError) -> tuple[str, int]:
    """What to tell the user about a command that failed, and the exit code that says why."""
    if isinstance(exc, FedheError):
        if isinstance(exc, InvalidRequest):
            code = EXIT_INVALID_INPUT
        elif isinstance(exc, UpstreamUnavailable):
            code = EXIT_UNREACHABLE
        else:
            code = EXIT_REFUSED
        return f"{exc.code}: {exc.message}", code
    if isinstance(exc, ValidationError):
        return f"invalid input: {exc}", EXIT_INVALID_INPUT
    return str(exc), EXIT_INVALID_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedhe`` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (FedheError, ValidationError, OSError) as exc:
        message, failed = _failure(exc)
        print(f"fedhe: {message}", file=sys.stderr)
        return failed
    return EXIT_OK if code is None else int(code)
