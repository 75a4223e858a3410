"""What a job expects of a site's data: input shape, feature columns and the class list.

Labels are mapped through the job's class list so that every site numbers classes alike:

* with ``class_names``, a label (CSV cell, NPZ entry or image sub-folder name) must be one of
  the names; integer-looking labels also match an integer-looking name of the same value
  (``4``, ``4.0`` and ``"4"`` all match the class named ``"4"``);
* without, a label must be an integer class index ``0 .. num_classes - 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedhe.errors import DataProblem


def _as_integer(text: str) -> int | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if math.isfinite(value) and value == int(value) else None


@dataclass(frozen=True)
class ClassList:
    """The job's classes: ``count`` of them, optionally with names."""

    count: int
    names: tuple[str, ...] | None = None

    def index(self, raw: object, where: str) -> int:
        """The class index of label ``raw``; ``where`` names the file and place for the error."""
        text = str(raw).strip()
        if self.names is not None:
            if text in self.names:
                return self.names.index(text)
            number = _as_integer(text)
            for i, name in enumerate(self.names):
                if number is not None and _as_integer(name) == number:
                    return i
            raise DataProblem(f"{where}: label {text!r} is not one of the job's classes ({', '.join(self.names)})")
        number = _as_integer(text)
        if number is None or not 0 <= number < self.count:
            raise DataProblem(f"{where}: label {text!r} is not a class index 0..{self.count - 1}")
        return number


@dataclass(frozen=True)
class DataSchema:
    """The job's data contract: ``input_shape`` per row, the class list and the CSV feature columns."""

    input_shape: tuple[int, ...]
    classes: ClassList
    feature_columns: tuple[str, ...] | None = None

    @property
    def is_image(self) -> bool:
        """Rows are H x W x C images."""
        return len(self.input_shape) == 3
