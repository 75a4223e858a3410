"""Keyless evaluation contexts: fetched once from the keyserver, kept in the database.

The aggregator refuses any context with a secret key (``load_evaluation_context``), so even a
misconfigured keyserver cannot make it able to decrypt.
"""

from __future__ import annotations

import threading
from typing import Protocol

from aggregator.repository import AggregatorRepository
from aggregator.tables import EvaluationContextRow
from fedhe.db import SessionFactory
from fedhe.errors import Conflict
from fedhe.he import PackingSettings, UpdateCodec, codec_for, load_evaluation_context
from fedhe.schemas import ContextInfo


class EvaluationContextSource(Protocol):
    """Where evaluation contexts come from (the keyserver)."""

    def evaluation_context(self, key_id: str) -> bytes:
        """The serialised keyless context of ``key_id``."""
        ...

    def context_info(self, key_id: str) -> ContextInfo:
        """Public facts about ``key_id``, including its federation."""
        ...


class EvaluationContexts:
    """Loads, caches and binds codecs to the evaluation context of each key_id."""

    def __init__(self, sessions: SessionFactory, source: EvaluationContextSource):
        self._sessions = sessions
        self._source = source
        self._codecs: dict[tuple[str, str, str], UpdateCodec] = {}
        self._lock = threading.Lock()

    def require_current(self, key_id: str) -> None:
        """``Conflict`` if the keyserver has retired ``key_id`` (new jobs must use the federation's current key)."""
        info = self._source.context_info(key_id)
        if info.retired_at is not None:
            raise Conflict(
                f"key {key_id} was retired at {info.retired_at.isoformat()}; use the federation's current key",
                code="stale_key_id",
            )

    def ensure(self, repo: AggregatorRepository, key_id: str) -> EvaluationContextRow:
        """``key_id``'s stored context (fetched from the keyserver with its federation if needed)."""
        row = repo.evaluation_context(key_id)
        if row is not None:
            return row
        info = self._source.context_info(key_id)
        data = self._source.evaluation_context(key_id)
        load_evaluation_context(data)
        row = EvaluationContextRow(key_id=key_id, federation_id=info.federation_id, context=data)
        repo.add(row)
        repo.flush()
        return row

    def context_bytes(self, key_id: str) -> bytes:
        """``key_id``'s serialised keyless context (for worker processes that sum chunks)."""
        with self._sessions.transaction() as session:
            return self.ensure(AggregatorRepository(session), key_id).context

    def codec(self, key_id: str, format_id: str, options: PackingSettings | None = None) -> UpdateCodec:
        """A codec bound to ``key_id``'s keyless context (and the job's packing settings, if any)."""
        cache_key = (key_id, format_id, options.model_dump_json() if options is not None else "")
        with self._lock:
            cached = self._codecs.get(cache_key)
            if cached is not None:
                return cached
            codec = codec_for(format_id, load_evaluation_context(self.context_bytes(key_id)), options=options)
            self._codecs[cache_key] = codec
            return codec
