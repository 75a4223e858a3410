"""Parsing, dispatch and exit codes of the ``fedhe`` command."""

from __future__ import annotations

import argparse
import os
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
EXIT_BROKEN_PIPE = 141
"""As a shell reports a command stopped by SIGPIPE."""

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


def validation_lines(exc: ValidationError, names: Callable[[str], str] = str) -> str:
    """One line per invalid field, without pydantic's documentation links; ``names`` turns a field
    into the user's word for it (an environment variable, a flag)."""
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"  {names(field)}: {message}" if field else f"  {message}")
    return "\n".join(lines)


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
        return f"invalid {exc.title}:\n{validation_lines(exc)}", EXIT_INVALID_INPUT
    if exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}", EXIT_INVALID_INPUT
    return str(exc), EXIT_INVALID_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedhe`` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader (``head``, a pager) stopped reading: nothing is wrong, and nothing more to say.
        # Python would report the pipe again when it flushes stdout at exit, so stdout goes nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (FedheError, ValidationError, OSError) as exc:
        message, failed = _failure(exc)
        print(f"fedhe: {message}", file=sys.stderr)
        return failed
    return EXIT_OK if code is None else int(code)
