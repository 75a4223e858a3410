"""The ``fedhe`` command line.

The common package owns the command's frame (parsing, output, error handling, exit codes) and
the commands that only talk to services over REST. Each service contributes its own commands
(``fedhe keyserver``, ``fedhe aggregator``, ``fedhe agent``, …) through the ``fedhe.commands``
entry-point group, so nothing here imports a service.
"""

from fedhe.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
