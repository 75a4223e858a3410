"""The site's privacy ledger: every DP-SGD pass the site ran, on disk.

A pass is recorded as soon as it finishes, before its update is uploaded: counting a pass
whose result never left the site overstates ε, never understates it.

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
    """One released training pass."""

    job_id: str
    round: int
    attempt: int
    training: TrainingPass


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

    def record(self, entry: LedgerEntry) -> None:
        """Append a pass; the file is replaced atomically so a crash never truncates it."""
        with self._lock:
            entries = [*self.entries(), entry]
            write_private_text(self._path, json.dumps([e.model_dump() for e in entries], indent=1))
