"""`audit prune`: records older than a date leave the database for an archive file, and the chain says so.

A trail must not grow forever (a SQLite trail on one machine gains about a kilobyte a request), and privacy rules
often cap how long prompts may be kept. Deleting records from a hash chain is exactly what `verify` exists to catch,
so a prune is done in the open:

1. The whole chain is verified first: a broken chain is evidence and is never pruned.
2. The records from the chain's start up to the first that arrived at or after `before` (a contiguous run of ids,
   cut as `export --since` cuts) are written to an archive, an export file that `audit verify --file` checks on its
   own, and the archive is read back and verified before anything is deleted.
3. A record is appended to the chain declaring the prune: the last id and hash archived, how many, the archive's
   name and sha256, who ran it. It is chained like any record, so it cannot be removed or changed unnoticed, and
   `verify` refuses a chain whose start moved without one.
4. The records are deleted in chunks, each in a transaction that moves the chain's start (audit_base) with them, so
   gateways go on appending meanwhile, and a prune cut short leaves a chain that verifies.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa

from gateway.audit import (AuditError, AuditRecord, audit_base, audit_head, audit_log, ensure_schema, make_engine,
                           open_audit_log)
from gateway.audit_admin import command_line_actor
from gateway.audit_read import (PRUNE_KEY, chain_start, export_line, iter_rows, parse_time, trail_reader, verify,
                                verify_jsonl)

CHUNK = 5_000  # records deleted per transaction: each holds up the gateways' commits for its length only


@dataclass(frozen=True, slots=True)
class PrunePlan:
    first_id: int  # the chain's start in the database
    prev_hash: str  # the hash that record links to
    through: int  # the last record to prune; first_id - 1 when there is none
    first_ts: float | None = None  # arrival times of the oldest and the newest record to prune
    last_ts: float | None = None

    @property
    def count(self) -> int:
        return self.through - self.first_id + 1


@dataclass(frozen=True, slots=True)
class PruneResult:
    plan: PrunePlan
    archive: Path | None
    archive_sha256: str | None
    last_hash: str
    declared_in: int  # the id of the record that declares the prune


def plan(db_url: str, before: str | float) -> PrunePlan:
    """What a prune at `before` would take: every record from the chain's start to the last one before the first
    that arrived at or after `before`."""
    before_ts = parse_time(before, "--before")
    if before_ts > time.time():
        raise AuditError(f"--before {before}: that time is still to come; a prune only takes records older than a "
                         "time already past", code="invalid_before")
    with trail_reader(db_url) as engine, engine.connect() as conn:
        first_id, prev_hash = chain_start(conn)
        last_id = conn.execute(sa.select(audit_head.c.last_id).where(audit_head.c.id == 1)).scalar() or 0
        kept = conn.execute(sa.select(sa.func.min(audit_log.c.id)).where(audit_log.c.ts >= before_ts)).scalar()
        through = (kept - 1) if kept is not None else last_id
        if through < first_id:
            return PrunePlan(first_id, prev_hash, first_id - 1)
        span = conn.execute(sa.select(sa.func.min(audit_log.c.ts), sa.func.max(audit_log.c.ts))
                            .where(audit_log.c.id <= through)).one()
        return PrunePlan(first_id, prev_hash, through, span[0], span[1])


def prune(db_url: str, before: str | float, archive: Path | None,
          progress: Callable[[int, int], None] | None = None, *, planned: PrunePlan | None = None
          ) -> PruneResult | None:
    """Archive (unless `archive` is None: deletion for data that must not be kept) and delete the records before
    `before` (or those `planned`, shown to the user first); None when there are none. `progress(done, total)` is
    called as chunks are deleted."""
    if archive is not None and archive.exists():
        raise AuditError(f"{archive} exists: an archive is never overwritten; name a new file",
                         code="archive_exists")
    p = planned if planned is not None else plan(db_url, before)
    if p.count <= 0:
        return None
    checked = verify(db_url)
    if not checked.ok:
        raise AuditError(f"the chain is broken, so nothing was pruned: {checked.reason}. A broken chain is evidence: "
                         "export it (`sovereign audit export`) and find out why first", code="chain_broken")
    last_hash, sha = _write_archive(db_url, p, archive) if archive is not None else (_hash_of(db_url, p.through),
                                                                                      None)
    declared_in = asyncio.run(_declare(db_url, p, before, last_hash, archive, sha))
    _delete(db_url, p, progress)
    return PruneResult(p, archive, sha, last_hash, declared_in)


def _write_archive(db_url: str, p: PrunePlan, archive: Path) -> tuple[str, str]:
    """Write records first_id..through as an export, durably (fsynced, then renamed into place), check it the way an
    auditor would, and return the last record's hash and the file's sha256."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(f".{archive.name}.tmp")
    digest = hashlib.sha256()
    last_hash = p.prev_hash
    try:
        # Owner-only, like the database: the records hold prompts as the teams' policies kept them.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "wb") as fh, trail_reader(db_url) as engine, engine.connect() as conn:
            for row in iter_rows(conn, through=p.through):
                last_hash = row["hash"]
                line = export_line(row).encode("utf-8")
                digest.update(line)
                fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        check = verify_jsonl(tmp, p.prev_hash if p.first_id > 1 else None)
        if not check.ok or check.count != p.count:
            raise AuditError(f"the archive did not verify ({check.reason}); nothing was pruned", code="archive_bad")
        os.replace(tmp, archive)
        _fsync_dir(archive.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return last_hash, digest.hexdigest()


def _hash_of(db_url: str, record_id: int) -> str:
    with trail_reader(db_url) as engine, engine.connect() as conn:
        return conn.execute(sa.select(audit_log.c.hash).where(audit_log.c.id == record_id)).scalar_one()


async def _declare(db_url: str, p: PrunePlan, before: str | float, last_hash: str, archive: Path | None,
                   sha: str | None) -> int:
    decl = {"first": p.first_id, "through": p.through, "last_hash": last_hash, "records": p.count,
            "before": datetime.fromtimestamp(parse_time(before, "--before"), timezone.utc).isoformat(),
            "archive": archive.name if archive is not None else None, "archive_sha256": sha, "by": command_line_actor()}
    record = AuditRecord(ts=time.time(), request_id=f"audit-prune-{uuid.uuid4().hex[:12]}", key_id=None, team=None,
                         model=None, adapter=None, status=0, policy={PRUNE_KEY: decl})
    log = open_audit_log(db_url)
    try:
        return await log.append(record)
    finally:
        await log.close()


def _delete(db_url: str, p: PrunePlan, progress: Callable[[int, int], None] | None) -> None:
    engine = make_engine(db_url)
    try:
        ensure_schema(engine)
        first = p.first_id
        while first <= p.through:
            end = min(first + CHUNK - 1, p.through)
            with engine.begin() as conn:
                q = sa.select(audit_base.c.first_id).where(audit_base.c.id == 1)
                if conn.dialect.name == "postgresql":
                    q = q.with_for_update()
                if conn.execute(q).scalar_one() != first:
                    raise AuditError(f"another prune moved the chain's start while this one ran (expected record "
                                     f"{first}); run `sovereign audit verify`", code="prune_conflict")
                end_hash = conn.execute(sa.select(audit_log.c.hash).where(audit_log.c.id == end)).scalar_one()
                conn.execute(audit_log.delete().where(audit_log.c.id <= end))
                conn.execute(audit_base.update().where(audit_base.c.id == 1).values(first_id=end + 1,
                                                                                     prev_hash=end_hash))
            if progress is not None:
                progress(end - p.first_id + 1, p.count)
            first = end + 1
    finally:
        engine.dispose()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
