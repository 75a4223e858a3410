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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedhe`` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except InvalidRequest as exc:
        print(f"fedhe: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_INVALID_INPUT
    except UpstreamUnavailable as exc:
        print(f"fedhe: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except FedheError as exc:
        print(f"fedhe: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_REFUSED
    except ValidationError as exc:
        print(f"fedhe: invalid input: {exc}", file=sys.stderr)
        return EXIT_INVALID_INPUT
    except OSError as exc:
        print(f"fedhe: {exc}", file=sys.stderr)
        return EXIT_INVALID_INPUT
    return EXIT_OK if code is None else int(code)
