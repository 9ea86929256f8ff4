"""Reading the audit trail back: `verify` walks the chain in the database (or `verify_jsonl` in an export) and names the
first record that breaks it; `export` writes records as JSONL, hashes included, for shipping elsewhere."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa

from gateway.audit import (GENESIS, RECORD_FIELDS, AuditError, audit_base, audit_head, audit_log, canonical_json,
                           make_engine, record_hash)
from gateway.audit_admin import ADMIN_KEY

PRUNE_KEY = "audit_prune"  # the policy key of the record `audit prune` appends
_PRUNE_QUOTED = f'"{PRUNE_KEY}"'  # ...as it appears in the stored JSON: a substring test before any parsing


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    count: int
    first_bad_id: int | None = None
    reason: str = ""


def iter_rows(conn: sa.Connection, since_ts: float | None = None, through: int | None = None
              ) -> Iterator[dict[str, Any]]:
    """Rows by id, up to `through` if given; with `since_ts`, from the first record that arrived at or after it on,
    without gaps.

    A record is written when its request ends, so `ts` (arrival) is not in id order: a long request that arrived just
    before `since_ts` sits among later ones. Filtering on `ts` alone would leave holes no verifier could tell from
    deletions; a contiguous run of ids is a piece of the chain that verifies against the hash before it.
    """
    q = sa.select(audit_log).order_by(audit_log.c.id)
    if since_ts is not None:
        first = conn.execute(sa.select(sa.func.min(audit_log.c.id)).where(audit_log.c.ts >= since_ts)).scalar()
        if first is None:
            return
        q = q.where(audit_log.c.id >= first)
    if through is not None:
        q = q.where(audit_log.c.id <= through)
    for row in conn.execution_options(stream_results=True, yield_per=2000).execute(q):
        yield dict(row._mapping)


def _check_chain(rows: Iterator[dict[str, Any]], head: tuple[int, str] | None,
                 start: tuple[int, str] = (1, GENESIS), *, pruned: bool = False) -> VerifyResult:
    """The chain rules, shared by the database and an exported file: ids from `start` on (1 and the genesis hash for
    a whole chain), each linked and hashed right. `pruned`: `start` is the database's, moved by `audit prune`, so a
    record of the chain itself must declare the records before it pruned (else they were deleted behind its back)."""
    expected_id, prev_hash = start
    count = 0
    declared: tuple[int, str, int] | None = None  # (through, last_hash, declaring id) of the furthest prune record
    for row in rows:
        rid = row["id"]
        if rid != expected_id:
            if rid > expected_id:
                missing = expected_id if rid == expected_id + 1 else f"{expected_id}..{rid - 1}"
                return VerifyResult(False, count, expected_id,
                                    f"record {missing} is missing: the chain jumps from {expected_id - 1} to {rid}")
            return VerifyResult(False, count, rid, f"record {rid} is out of order (expected {expected_id})")
        if row["prev_hash"] != prev_hash:
            return VerifyResult(False, count, rid, f"record {rid} does not link to record {rid - 1} (its prev_hash "
                                                    "differs): a record before it was changed, removed or reordered")
        if record_hash(prev_hash, row) != row["hash"]:
            return VerifyResult(False, count, rid, f"record {rid} was modified: its contents do not match its hash")
        if pruned and _PRUNE_QUOTED in row["policy"]:
            through, last_hash = prune_declaration(row)
            if declared is None or through >= declared[0]:
                declared = (through, last_hash, rid)
        prev_hash = row["hash"]
        expected_id += 1
        count += 1
    last_seen = expected_id - 1
    if pruned and start[0] > 1:
        gone = 1 if start[0] == 2 else f"1..{start[0] - 1}"
        if declared is None or declared[0] < start[0] - 1:
            return VerifyResult(False, count, 1, f"record {gone} is missing: the chain starts at record {start[0]} "
                                                 "and no prune record in it declares the records before it pruned")
        if declared[0] == start[0] - 1 and declared[1] != start[1]:
            return VerifyResult(False, count, start[0], f"the chain's start (the hash before record {start[0]}) is "
                                                        f"not the one prune record {declared[2]} declares")
    if head is not None:
        last_id, last_hash = head
        if last_id > last_seen:
            missing = last_seen + 1 if last_id == last_seen + 1 else f"{last_seen + 1}..{last_id}"
            return VerifyResult(False, count, last_seen + 1, f"records {missing} are missing from the end of the "
                                                             f"chain (the chain head says {last_id} records)")
        if last_id != last_seen or last_hash != prev_hash:
            return VerifyResult(False, count, min(last_id + 1, last_seen),
                                f"the chain head (record {last_id}) does not match the last record ({last_seen})")
    if pruned and start[0] > 1:
        return VerifyResult(True, count, None, f"{count} records ({start[0]}..{last_seen}), chain intact; records "
                                               f"1..{start[0] - 1} were pruned (declared in record {declared[2]})")
    return VerifyResult(True, count, None, f"{count} records, chain intact")


def prune_declaration(row: dict[str, Any]) -> tuple[int, str]:
    """(through, last_hash) of a record written by `audit prune`: records up to `through` were archived and deleted,
    the last of them hashed `last_hash`."""
    if row["key_id"] is not None or row["status"] != 0:
        return 0, ""  # a request's record, whatever its policy says
    try:
        decl = json.loads(row["policy"])[PRUNE_KEY]
        return int(decl["through"]), str(decl["last_hash"])
    except (ValueError, KeyError, TypeError):
        return 0, ""


def verify(db_url: str) -> VerifyResult:
    """Walk the chain from its start (record 1 unless pruned); the first edited, missing or out-of-place record is
    named."""
    engine = make_engine(db_url, writer=False)
    try:
        insp = sa.inspect(engine)
        if not insp.has_table("audit_log") or not insp.has_table("audit_head"):
            return VerifyResult(False, 0, None, "no audit trail in this database (tables audit_log/audit_head missing)")
        with engine.connect() as conn:  # one transaction: a consistent snapshot while gateways keep appending
            head = conn.execute(sa.select(audit_head.c.last_id, audit_head.c.last_hash)
                                .where(audit_head.c.id == 1)).first()
            if head is None:
                return VerifyResult(False, 0, None, "the chain head row is missing")
            return _check_chain(iter_rows(conn), (int(head[0]), str(head[1])), chain_start(conn), pruned=True)
    finally:
        engine.dispose()


def chain_start(conn: sa.Connection) -> tuple[int, str]:
    """(first id, the hash it links to) of the chain in the database: (1, genesis) until a prune moved it, and in a
    trail from before `audit prune` existed (no audit_base table)."""
    if not sa.inspect(conn).has_table("audit_base"):
        return 1, GENESIS
    row = conn.execute(sa.select(audit_base.c.first_id, audit_base.c.prev_hash).where(audit_base.c.id == 1)).first()
    return (1, GENESIS) if row is None else (int(row[0]), str(row[1]))


def verify_jsonl(path: str | Path, anchor: str | None = None) -> VerifyResult:
    """Check an `export` file on its own: what an auditor runs on their copy.

    A whole export starts at record 1. One made with `--since` starts later and can only prove itself internally
    unless its first record's prev_hash is checked against the last hash of an earlier export, `anchor`; without one
    the result says which hash it hangs from.
    """

    def rows() -> Iterator[dict[str, Any]]:
        with open(path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                try:
                    row = json.loads(line.decode("utf-8"))
                    row["policy"] = canonical_json(row["policy"])
                    missing = [k for k in ("id", *RECORD_FIELDS, "prev_hash", "hash") if k not in row]
                    if missing:
                        raise ValueError("missing " + ", ".join(missing))
                    if type(row["id"]) is not int or not isinstance(row["prev_hash"], str):
                        raise TypeError("id must be an integer and prev_hash a string")
                except (ValueError, KeyError, TypeError) as exc:
                    raise AuditError(f"{path}:{lineno}: not an audit export line ({exc})",
                                     code="invalid_export") from None
                yield row

    it = rows()
    first = next(it, None)
    if first is None:
        return VerifyResult(True, 0, None, "0 records")
    start = (1, GENESIS) if first["id"] == 1 else (first["id"], first["prev_hash"])
    if anchor is not None and first["prev_hash"] != anchor:
        return VerifyResult(False, 0, first["id"], f"record {first['id']} does not link to the given anchor: its "
                                                   f"prev_hash is {first['prev_hash']}")
    result = _check_chain(itertools.chain([first], it), None, start)
    if result.ok and start[0] != 1:
        pinned = "linked to the given anchor" if anchor is not None else (
            f"hanging from prev_hash {start[1]}: check it against record {start[0] - 1} of an earlier export")
        return VerifyResult(True, result.count, None, f"records {start[0]}..{start[0] + result.count - 1}, chain "
                                                      f"intact, {pinned}")
    return result


def parse_time(value: float | int | str | datetime | None, option: str = "--since") -> float | None:
    """Unix seconds from a time given as unix seconds or ISO 8601 (UTC unless it names a zone)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return parse_time(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError:
        raise AuditError(f"{option} {value!r}: expected an ISO date/time (2026-11-23T10:00:00Z) or unix seconds",
                         code=f"invalid_{option.lstrip('-')}") from None


def export(db_url: str, out: str | Path | IO[str], since: float | str | datetime | None = None) -> int:
    """Write records as JSON lines with their hashes; returns how many were written. With `since` (a time): from the
    first record of a request that arrived then, every later record (see `_iter_rows`), a piece `verify_jsonl` checks.

    A path is written to a temp file and renamed, so a failed export never leaves half a file.
    """
    since_ts = parse_time(since)
    with trail_reader(db_url) as engine:
        if isinstance(out, (str, Path)):
            target = Path(out)
            tmp = target.with_name(f".{target.name}.tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                n = _export_to(engine, fh, since_ts)
                fh.flush()
            tmp.replace(target)
            return n
        return _export_to(engine, out, since_ts)


@contextmanager
def trail_reader(db_url: str) -> Iterator[sa.Engine]:
    """A read-only engine on the audit trail at `db_url`, disposed afterwards; audit_not_found where there is none."""
    engine = make_engine(db_url, writer=False)
    try:
        if not sa.inspect(engine).has_table("audit_log"):
            raise AuditError("no audit trail in this database (table audit_log missing)", code="audit_not_found")
        yield engine
    finally:
        engine.dispose()


def _export_to(engine: sa.Engine, fh: IO[str], since_ts: float | None) -> int:
    n = 0
    with engine.connect() as conn:
        for row in iter_rows(conn, since_ts):
            fh.write(export_line(row))
            n += 1
    return n


def export_line(row: dict[str, Any]) -> str:
    """A database row as one line of an export: policy as JSON, and the arrival time in ISO 8601 for people."""
    row["policy"] = json.loads(row["policy"])
    row["time"] = datetime.fromtimestamp(row["ts"], tz=timezone.utc).isoformat()
    return canonical_json(row) + "\n"


def changes(db_url: str, team: str | None = None, since: float | None = None) -> list[dict[str, Any]]:
    """The trail's own records, oldest first: changes to teams and keys (audit_admin.py) and prunes, each as
    {id, time, action, team, by, details}; with `team`, those that touched it."""
    out = []
    with trail_reader(db_url) as engine, engine.connect() as conn:
        q = sa.select(audit_log.c.id, audit_log.c.ts, audit_log.c.team, audit_log.c.policy).where(
            audit_log.c.status == 0).order_by(audit_log.c.id)
        if team is not None:
            q = q.where(audit_log.c.team == team)
        if since is not None:
            q = q.where(audit_log.c.ts >= since)
        for rid, ts, row_team, policy in conn.execute(q):
            policy = json.loads(policy)
            details = policy.get(ADMIN_KEY) or ({"action": "audit.prune", **policy[PRUNE_KEY]}
                                                if PRUNE_KEY in policy else None)
            if details is None:
                continue
            details = dict(details)
            out.append({"id": rid, "time": datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(),
                        "action": details.pop("action"), "team": row_team, "by": details.pop("by", None),
                        "details": details})
    return out
