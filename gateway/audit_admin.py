"""Changes to teams and keys, in the audit trail.

An auditor asks who turned a team's PII redaction off, who made that key, who revoked it and when; the answer must be
as tamper-evident as the requests themselves. Each change made through `Accounts` (the admin API, `sovereign teams`
and `sovereign keys`) appends one record after it commits: status 0 (not an API request, so chargeback leaves it
out), `key_id` the admin key that made it (none from the command line), `team` the team it touched, and in `policy`
`{"admin": {"action": ..., "by": ..., ...}}` with what changed (a team's fields as [before, after]). Secrets never.
"""

from __future__ import annotations

import getpass
import socket
import threading
import time
import uuid
from typing import Any

import sqlalchemy as sa

from gateway.audit import AuditRecord, append_now, ensure_schema, make_engine

ADMIN_KEY = "admin"  # the policy key of these records


class AdminTrail:
    """Appends change records to the audit trail at `audit_url`; the connection opens at the first change."""

    def __init__(self, audit_url: str) -> None:
        self._url = audit_url
        self._engine: sa.Engine | None = None
        self._lock = threading.Lock()  # the admin API runs its handlers on a thread pool

    def record(self, action: str, *, team: str | None, by: str | None, **details: Any) -> int:
        """Append one change; `by` is the admin key's id (`key_...`), another name for who it was (the gateway's
        own start), or None for the command line (then the OS user and host)."""
        entry = {"action": action, "by": by or command_line_actor(), **details}
        key_id = by if by is not None and by.startswith("key_") else None
        rec = AuditRecord(ts=time.time(), request_id=f"admin-{uuid.uuid4().hex[:16]}", key_id=key_id, team=team,
                          model=None, adapter=None, status=0, policy={ADMIN_KEY: entry})
        with self._lock:
            if self._engine is None:
                engine = make_engine(self._url)
                ensure_schema(engine)
                self._engine = engine
            return append_now(self._engine, rec)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def command_line_actor() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # a container user with no passwd entry
        user = "?"
    return f"cli:{user}@{socket.gethostname()}"
