"""The keyserver's member listing: every member with its endorsers, read in one query."""

from __future__ import annotations

import base64
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event

from fedhe.db import SessionFactory, make_engine, utcnow
from fedhe.ratelimit import RateLimiter
from fedhe.schemas import MemberStatus
from keyserver.metrics import KeyserverMetrics
from keyserver.nonces import nonce_store_for
from keyserver.sealing import SecretSealer
from keyserver.service import KeyService
from keyserver.tables import EndorsementRow, FederationRow, KeyserverBase, MemberRow

FEDERATION = "fed-0000000000000001"
MEMBERS = 20


def _site(i: int) -> str:
    return f"site-{i:016x}"


def test_members_come_with_their_endorsers_from_one_query_whatever_their_number(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/ks.db")
    KeyserverBase.metadata.create_all(engine)
    sessions = SessionFactory(engine)
    start = utcnow()
    with sessions.transaction() as session:
        session.add(FederationRow(id=FEDERATION, name="f", current_key_id="key-0", endorsements_required=2))
        session.flush()
        for i in range(MEMBERS):
            status = MemberStatus.ACTIVE if i < 2 else MemberStatus.PROPOSED
            session.add(
                MemberRow(
                    federation_id=FEDERATION,
                    site_id=_site(i),
                    name=f"site {i}",
                    public_key=f"key-{i}",
                    status=status.value,
                    proposed_by="account:admin",
                    proposed_at=start + timedelta(seconds=MEMBERS - i),
                )
            )
        for candidate, endorser, key, seconds in [(2, 1, "key-2", 2), (2, 0, "key-2", 1), (3, 0, "stale-key", 1)]:
            session.add(
                EndorsementRow(
                    federation_id=FEDERATION,
                    site_id=_site(candidate),
                    endorser_site_id=_site(endorser),
                    public_key=key,
                    signature="sig",
                    at=start + timedelta(seconds=seconds),
                )
            )
    service = KeyService(
        sessions,
        SecretSealer(base64.b64encode(os.urandom(32)).decode()),
        nonce_store_for(None, "fedhe", sessions),
        audience="https://keyserver.test",
        max_skew_s=60,
        metrics=KeyserverMetrics(),
        limiter=RateLimiter({}),
    )
    statements: list[str] = []

    def record(*args: Any) -> None:
        statements.append(args[2])

    event.listen(engine, "before_cursor_execute", record)
    members = service.members(FEDERATION)
    event.remove(engine, "before_cursor_execute", record)

    assert [m.site_id for m in members] == [_site(i) for i in reversed(range(MEMBERS))]
    endorsed = {m.site_id: m.endorsed_by for m in members if m.endorsed_by}
    assert endorsed == {_site(2): [_site(0), _site(1)]}, "oldest first; an endorsement of another key is not listed"
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 2, "the federation, then its members with their endorsers"
