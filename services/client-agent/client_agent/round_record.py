"""What a site keeps on disk about one round it takes part in, so no retry or restart spends
privacy budget twice or breaks secure aggregation's rules (ADR 0010).

- the noised update it trained (or the noised statistics vector), made once per round: every
  attempt of the round re-sends it under fresh masks, and its ledger entry was made once;
- per attempt, its X25519 secret (from advertising to unmasking) and the statement it signed
  for its upload;
- the one attempt whose unmasking it answered: it answers no other, and uploads to no later
  attempt of the round.

Everything is 0600 in the agent's 0700 state directory and removed once the round is applied.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel

from fedhe.files import write_private
from fedhe.secagg.keys import AttemptKey
from fedhe.secagg.messages import UploadStatement


class MadeUpdate(BaseModel):
    """A round's noised update as the site made it, before any mask or encryption."""

    num_samples: int
    metrics: dict[str, float]


class _Attempt(BaseModel):
    x25519: str | None = None
    statement: UploadStatement | None = None


class _Record(BaseModel):
    attempts: dict[int, _Attempt] = {}
    answered_attempt: int | None = None


class RoundRecord:
    """One round's durable record at this site (``path`` names its JSON; the update sits beside it)."""

    def __init__(self, path: Path):
        self._path = path
        self._update_path = path.with_suffix(".npz")
        self._record = _Record.model_validate_json(path.read_bytes()) if path.exists() else _Record()

    def _save(self) -> None:
        write_private(self._path, self._record.model_dump_json().encode())

    def update(self) -> tuple[NDArray[Any], MadeUpdate] | None:
        """The noised update made for this round, if it was made."""
        if not self._update_path.exists():
            return None
        with np.load(self._update_path, allow_pickle=False) as saved:
            made = MadeUpdate.model_validate_json(saved["made"].tobytes())
            return saved["values"].astype(np.float64), made

    def save_update(self, values: NDArray[Any], made: MadeUpdate) -> None:
        """Keep the round's noised update (once: a later attempt re-sends it)."""
        buffer = io.BytesIO()
        np.savez(buffer, values=values, made=np.frombuffer(made.model_dump_json().encode(), dtype=np.uint8))
        write_private(self._update_path, buffer.getvalue())

    def attempt_key(self, attempt: int) -> AttemptKey:
        """This attempt's X25519 key pair (made and kept on first use)."""
        entry = self._record.attempts.setdefault(attempt, _Attempt())
        if entry.x25519 is None:
            key = AttemptKey.generate()
            entry.x25519 = key.private_bytes().hex()
            self._save()
            return key
        return AttemptKey.from_bytes(bytes.fromhex(entry.x25519))

    def statement(self, attempt: int) -> UploadStatement | None:
        """The statement this site signed for its upload to ``attempt``, if it uploaded."""
        entry = self._record.attempts.get(attempt)
        return None if entry is None else entry.statement

    def save_statement(self, attempt: int, statement: UploadStatement) -> None:
        """Keep the statement of this site's upload to ``attempt`` (before the upload is sent)."""
        self._record.attempts.setdefault(attempt, _Attempt()).statement = statement
        self._save()

    @property
    def answered_attempt(self) -> int | None:
        """The attempt whose unmasking this site answered, if any."""
        return self._record.answered_attempt

    def record_answer(self, attempt: int) -> None:
        """Note, before the answer is sent, that this site answers ``attempt``'s unmasking."""
        self._record.answered_attempt = attempt
        self._save()

    def remove(self) -> None:
        """Forget the round (its aggregate was applied, or the job ended)."""
        self._path.unlink(missing_ok=True)
        self._update_path.unlink(missing_ok=True)
