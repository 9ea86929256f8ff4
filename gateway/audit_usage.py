"""Usage from the audit trail, for chargeback: requests and tokens per team, key, model, adapter, day or month.

Every request has one record holding the token counts its quota settled on (the model server's own counts), so these
sums are what each team was charged, read from the store an auditor already trusts. Refused and failed requests
count as requests and errors, with the tokens they used (none for most).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import sqlalchemy as sa

from gateway.audit import AuditError, audit_log
from gateway.audit_read import trail_reader

GROUPS = ("team", "key", "model", "adapter", "status", "day", "month")
_COLUMNS = {"team": audit_log.c.team, "key": audit_log.c.key_id, "model": audit_log.c.model,
            "adapter": audit_log.c.adapter, "status": audit_log.c.status}
_DAY_S = 86_400


@dataclass(slots=True)
class Usage:
    group: dict[str, str | int | None]  # one value per grouping asked for, in its order
    requests: int = 0
    errors: int = 0  # status 400 and above: refusals, upstream failures, clients that hung up (499)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_request_at: float | None = None  # unix seconds: `--by key` says which keys nobody uses any more

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict:
        last = self.last_request_at
        return {**asdict(self), "total_tokens": self.total_tokens,
                "last_request_at": datetime.fromtimestamp(last, UTC).isoformat() if last is not None else None}

    def add(self, requests: int, errors: int, prompt_tokens: int, completion_tokens: int,
            last_request_at: float | None) -> None:
        self.requests += requests
        self.errors += errors
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        if last_request_at is not None and (self.last_request_at is None or last_request_at > self.last_request_at):
            self.last_request_at = last_request_at


def total(rows: list[Usage]) -> Usage:
    out = Usage({})
    for r in rows:
        out.add(r.requests, r.errors, r.prompt_tokens, r.completion_tokens, r.last_request_at)
    return out


def usage(db_url: str, by: list[str], since: float | None = None, until: float | None = None) -> list[Usage]:
    """Sums over records with since <= ts < until, one row per distinct value of the `by` groupings (none: one row),
    sorted by them. Days and months are UTC."""
    unknown = [g for g in by if g not in GROUPS]
    if unknown or len(set(by)) != len(by):
        raise AuditError(f"--by {','.join(by)}: group by one or more of {', '.join(GROUPS)}, each once",
                         code="invalid_group")
    with trail_reader(db_url) as engine:
        # Months are days summed here: the SQL stays the same on SQLite and PostgreSQL, and a year is 365 rows a group.
        sql_groups = ["day" if g == "month" else g for g in by]
        day = (sa.func.floor(audit_log.c.ts / _DAY_S) if engine.dialect.name == "postgresql"
               else sa.cast(audit_log.c.ts / _DAY_S, sa.Integer))  # SQLite: truncation, and every ts is positive
        cols = [(day if g == "day" else _COLUMNS[g]).label(f"g{i}") for i, g in enumerate(sql_groups)]
        errors = sa.func.sum(sa.case((audit_log.c.status >= 400, 1), else_=0))
        q = sa.select(*cols, sa.func.count(), errors, sa.func.sum(audit_log.c.prompt_tokens),
                      sa.func.sum(audit_log.c.completion_tokens), sa.func.max(audit_log.c.ts))
        q = q.where(audit_log.c.status != 0)  # the trail's own records (a prune's declaration) are no request
        if since is not None:
            q = q.where(audit_log.c.ts >= since)
        if until is not None:
            q = q.where(audit_log.c.ts < until)
        if cols:
            q = q.group_by(*cols)
        with engine.connect() as conn:
            rows = conn.execute(q).all()
    merged: dict[tuple, Usage] = {}
    for row in rows:
        key = tuple(_label(g, v) for g, v in zip(by, row[:len(by)]))
        if not row[len(by)]:
            continue  # no records at all: SQL's one row of an ungrouped count
        *counts, last = row[len(by):]
        merged.setdefault(key, Usage(dict(zip(by, key)))).add(*(int(n or 0) for n in counts),
                                                               float(last) if last is not None else None)
    return [merged[k] for k in sorted(merged, key=lambda k: tuple((v is None, str(v)) for v in k))]


def _label(group: str, value) -> str | int | None:
    if group in ("day", "month"):
        day = datetime.fromtimestamp(int(value) * _DAY_S, UTC)
        return day.strftime("%Y-%m-%d" if group == "day" else "%Y-%m")
    return value
