"""Every problem in a site's data at once: a site admin fixes the file once, not once per run.

Loaders record each problem they find (a NaN cell, an unknown class, an unreadable image) and
go on reading; at the end one ``DataProblem`` lists them all. Warnings are for what was
tolerated (a semicolon delimiter, a ``Thumbs.db`` beside the images) and never stop loading.
"""

from __future__ import annotations

from fedhe.errors import DataProblem

MAX_LISTED = 200
"""Problems listed in full; past this the count is given (a file with every row broken says so)."""


class DataProblems:
    """The problems and warnings found while loading one data source."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.unlisted = 0

    def add(self, message: str) -> None:
        """Record a problem and go on reading."""
        if len(self.problems) < MAX_LISTED:
            self.problems.append(message)
        else:
            self.unlisted += 1

    def warn(self, message: str) -> None:
        """Record something tolerated (the caller shows or logs the warnings)."""
        self.warnings.append(message)

    def stop(self, message: str) -> DataProblem:
        """Record a problem after which nothing more can be read, as the error to raise."""
        self.add(message)
        return self.error()

    def error(self) -> DataProblem:
        """One ``DataProblem`` naming every problem recorded (``detail['problems']`` lists them)."""
        total = len(self.problems) + self.unlisted
        if total == 1:
            message = self.problems[0]
        else:
            listed = "\n".join(f"  - {problem}" for problem in self.problems)
            more = f"\n  … and {self.unlisted} more" if self.unlisted else ""
            message = f"{total} problems in the site's data:\n{listed}{more}"
        return DataProblem(message, detail={"problems": list(self.problems), "unlisted": self.unlisted})

    def raise_if_any(self) -> None:
        """Raise the ``DataProblem`` listing every problem, if there was one."""
        if self.problems:
            raise self.error()
