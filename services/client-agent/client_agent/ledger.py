"""The site's privacy ledger: every DP-SGD pass (and statistics step) the site ran, on disk.

A pass is recorded as soon as it finishes, before anything made from it leaves the site, and
counts from then on: a crash between training and upload overstates ε, never understates it.
It is marked released just before its result is first sent. A round that ends without this
site having sent anything made from a pass (its roster closed without the site, the round
failed before it uploaded, the job stopped) drops that pass again: nothing was released, so
nothing was spent, and a retry never trains twice (``client_agent.round_record``).

ε is always recomputed from the whole ledger (PLD composition over every pass on this site's
data, across rounds and jobs, ``fedhe.privacy.epsilon_spent``), so a restart never forgets budget already spent.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from pydantic import BaseModel

from fedhe.files import write_private_text
from fedhe.privacy import TrainingPass, epsilon_spent


class LedgerEntry(BaseModel):
    """One training pass (or statistics step) on this site's data."""

    job_id: str
    round: int
    attempt: int
    training: TrainingPass
    released: bool = True


class PrivacyLedger:
    """An append-only JSON ledger, written atomically."""

    def __init__(self, path: Path):
        self._path = path
        self._lock = threading.Lock()

    def entries(self) -> list[LedgerEntry]:
        """All recorded passes."""
        if not self._path.exists():
            return []
        raw = json.loads(self._path.read_text(encoding="utf-8"))
        return [LedgerEntry.model_validate(item) for item in raw]

    def epsilon(self, delta: float, extra: TrainingPass | None = None) -> float:
        """ε at ``delta`` of everything recorded (plus ``extra``, to test a pass before running it)."""
        passes = [entry.training for entry in self.entries()]
        if extra is not None:
            passes.append(extra)
        return epsilon_spent(passes, delta)

    def _write(self, entries: list[LedgerEntry]) -> None:
        write_private_text(self._path, json.dumps([e.model_dump() for e in entries], indent=1))

    def record(self, entry: LedgerEntry) -> None:
        """Append a pass; the file is replaced atomically so a crash never truncates it."""
        with self._lock:
            self._write([*self.entries(), entry])

    def mark_released(self, job_id: str, round_number: int) -> None:
        """Note that what a round's pass made is about to leave the site (before it is sent)."""
        with self._lock:
            entries = self.entries()
            if any(e.job_id == job_id and e.round == round_number and not e.released for e in entries):
                self._write(
                    [
                        e.model_copy(update={"released": True}) if e.round == round_number and e.job_id == job_id else e
                        for e in entries
                    ]
                )

    def drop_unreleased(self, job_id: str, round_number: int | None = None) -> None:
        """Forget passes of a finished round (or of every round of a finished job) that released nothing."""
        with self._lock:
            entries = self.entries()
            kept = [
                e
                for e in entries
                if e.released or e.job_id != job_id or (round_number is not None and e.round != round_number)
            ]
            if len(kept) != len(entries):
                self._write(kept)
