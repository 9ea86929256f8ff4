"""Audit trail: one hash-chained record per request, durable before the response completes (and, with status 0,
records of the trail's own: changes to teams and keys, audit_admin.py, and prunes, audit_prune.py).

Each record stores the previous record's hash and its own hash, sha256(prev_hash + canonical JSON of the record with
its id), and ids run 1, 2, 3, ... without gaps, so an edited, deleted or reordered record breaks the chain at that
record. A one-row head table (last id, last hash) is updated in the same transaction, so cutting records off the end
is detected too; it is also the lock that serializes appends: several gateway processes writing to one PostgreSQL
take the head row `FOR UPDATE`, SQLite takes its write lock with `BEGIN IMMEDIATE`. The other end is a one-row base
table (first id, the hash it links to): record 1 and the genesis hash until `audit prune` (audit_prune.py) archives
the oldest records, in the open.

Group commit: `append` hands the record to one background writer thread per log and waits; the writer takes
everything queued, writes it in one transaction (one fsync: SQLite in WAL with synchronous=FULL, PostgreSQL's commit)
and only then wakes the appenders. Concurrent requests share a commit instead of queueing behind one each.
A caller that is alone (`append(record, alone=True)`: the gateway with one request in flight) commits on its own
thread instead when the log is SQLite and the writer is idle: there is nothing to group, and waking the writer thread
and then the event loop again cost more than the commit itself (measured on the 2-core box: p50 223 vs 104 µs with
synchronous=NORMAL, 449 vs 270-330 µs with FULL). It never waits for another process's write lock there; it queues.

Checkpoints (SQLite): copying the WAL back into the database file every ~1,000 pages, and fsyncing it, is left to a
background thread instead of whichever commit crosses the line, where it stalled that request 2-8 ms (synchronous=NORMAL
worst, having the whole WAL to flush). The committing connections keep an autocheckpoint only as a backstop, far
further out, should the thread fall behind.

The chain proves integrity relative to the head; someone who can rewrite the whole table and the head can forge a new
chain, which is why `export` exists (audit_read.py): ship the JSONL (with hashes) elsewhere and an old head hash pins
history.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from sovereign.errors import SovereignError

log = logging.getLogger("sovereign.gateway.audit")

GENESIS = "0" * 64
BUSY_TIMEOUT_MS = 60_000  # how long a SQLite writer waits for another process's write lock
_MAX_BATCH = 512
# A background checkpoint after this many commits or records, whichever comes first: ~1,000 WAL pages either way
# (SQLite's default interval; a lone record's commit writes 2 pages, the table's and the head's, and a group commit
# ~0.15 per record more).
CHECKPOINT_COMMITS = 500
CHECKPOINT_RECORDS = 5_000
CHECKPOINT_IDLE_S = 1.0  # a quiet log's last commits are checkpointed after this long
BACKSTOP_PAGES = 16_000  # a committing connection checkpoints by itself only past this WAL size (~64 MB)


class AuditError(SovereignError):
    code = "audit_error"


@dataclass(slots=True)
class AuditRecord:
    """One request as the audit trail keeps it; prompt/completion are already absent, hashed or redacted by policy."""

    ts: float  # unix seconds (UTC) when the request arrived
    request_id: str
    key_id: str | None
    team: str | None
    model: str | None
    adapter: str | None
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    policy: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None
    completion: str | None = None


RECORD_FIELDS = [f.name for f in fields(AuditRecord)]

metadata = sa.MetaData()
audit_log = sa.Table(
    "audit_log", metadata,
    # INTEGER PRIMARY KEY on SQLite is the rowid itself: one B-tree fewer to write per record than BIGINT (64-bit
    # either way).
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=False),
    sa.Column("ts", sa.Double, nullable=False),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("key_id", sa.String(128)),
    sa.Column("team", sa.String(128)),
    sa.Column("model", sa.String(256)),
    sa.Column("adapter", sa.String(256)),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("latency_ms", sa.Double, nullable=False),
    sa.Column("ttft_ms", sa.Double),
    sa.Column("policy", sa.Text, nullable=False),  # canonical JSON, hashed as stored
    sa.Column("prompt", sa.Text),
    sa.Column("completion", sa.Text),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)
# Indexes only where commits are shared: on SQLite every index is one more WAL page in each lone record's fsynced
# commit (~30 µs of the p50 of each request at one connection, measured), bought for an occasional `export --since`,
# which scans the table instead.
_INDEXES = ("ix_audit_log_ts", "ix_audit_log_request_id")
sa.Index(_INDEXES[0], audit_log.c.ts).ddl_if(dialect="postgresql")
sa.Index(_INDEXES[1], audit_log.c.request_id).ddl_if(dialect="postgresql")
audit_head = sa.Table(
    "audit_head", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),  # always 1
    sa.Column("last_id", sa.BigInteger, nullable=False),
    sa.Column("last_hash", sa.String(64), nullable=False),
)
# Where the chain in the table starts: record 1 and the genesis hash until `audit prune` (audit_prune.py) moves the
# records before a date into an archive, and then the first record kept and the hash it links to.
audit_base = sa.Table(
    "audit_base", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),  # always 1
    sa.Column("first_id", sa.BigInteger, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
)


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# The C encoder json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False) runs, built
# once: json.dumps builds one per call, about half of its time on a record. Same bytes (a test compares them).
_canonical = json.encoder.c_make_encoder(None, _not_json, json.encoder.encode_basestring, None, ":", ",", True, False,
                                         False)


def add_tool_call(call: dict, parts: list[str]) -> None:
    """Append a tool call the model made (a chat `function` or a Responses `function_call` item: `name`,
    `arguments`) to a record's completion text as `[tool_call NAME] ARGUMENTS`; a streamed call's first piece has
    the name, its later ones the arguments."""
    if isinstance(call.get("name"), str):
        parts.append(f"[tool_call {call['name']}] ")
    if isinstance(call.get("arguments"), str):
        parts.append(call["arguments"])


def canonical_json(value: Any) -> str:
    return "".join(_canonical(value, 0))


def record_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """sha256 over the previous hash and the row's canonical JSON (id and every record field, policy as stored)."""
    body = {name: row[name] for name in ("id", *RECORD_FIELDS)}
    return hashlib.sha256((prev_hash + canonical_json(body)).encode("utf-8")).hexdigest()


def _row_of(record: AuditRecord, row_id: int) -> dict[str, Any]:
    # Typed as stored, so the hash computed now is the one `verify` recomputes from the database.
    return {"id": row_id, "ts": float(record.ts), "request_id": record.request_id, "key_id": record.key_id,
            "team": record.team, "model": record.model, "adapter": record.adapter, "status": int(record.status),
            "prompt_tokens": int(record.prompt_tokens), "completion_tokens": int(record.completion_tokens),
            "latency_ms": float(record.latency_ms),
            "ttft_ms": None if record.ttft_ms is None else float(record.ttft_ms),
            "policy": canonical_json(record.policy or {}), "prompt": record.prompt, "completion": record.completion}


def normalize_url(db_url: str) -> str:
    """Accept plain `postgresql://` (use psycopg 3) and a bare file path (SQLite)."""
    if db_url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + db_url.split("://", 1)[1]
    if "://" not in db_url:
        return f"sqlite:///{Path(db_url).expanduser()}"
    return db_url


def make_engine(db_url: str, *, writer: bool = True) -> sa.Engine:
    """An engine whose transactions suit the chain: SQLite in WAL with synchronous=FULL, and BEGIN IMMEDIATE for a
    writer (take the write lock before reading the head, or two processes could both extend the same head).

    `?synchronous=normal` on a SQLite URL trades power-loss durability for latency: each commit then reaches the
    operating system (a killed gateway loses nothing acknowledged) but is fsynced only at checkpoints.
    """
    url = normalize_url(db_url)
    if url.startswith("sqlite"):
        parsed = sa.engine.make_url(url)
        synchronous = str(parsed.query.get("synchronous", "full")).upper()
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise AuditError(f"{db_url}: synchronous must be full, normal or extra, got {synchronous.lower()!r}",
                             code="invalid_database_url")
        parsed = parsed.difference_update_query(["synchronous"])
        url = parsed.render_as_string(hide_password=False)
        path = parsed.database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # pysqlite's own transaction handling would defer the write lock
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            if writer:
                cur.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn):  # a reader gets a consistent WAL snapshot without blocking writers
            conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")

        return engine
    if not writer:  # verify reads the head and then every row: one snapshot, or appends in between fail it
        return sa.create_engine(url, pool_pre_ping=True, isolation_level="REPEATABLE READ")
    return sa.create_engine(url, pool_pre_ping=True)


def ensure_schema(engine: sa.Engine) -> None:
    """Create the tables and the head row if missing; safe when several processes start at once."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Two gateways creating the tables at once would collide on the catalog; take turns.
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": 0x50F7A0D1})
        metadata.create_all(conn, checkfirst=True)
        if conn.dialect.name == "sqlite":  # trails created before the indexes were dropped from SQLite
            for name in _INDEXES:
                conn.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")
        if conn.execute(sa.select(audit_head.c.id).where(audit_head.c.id == 1)).first() is None:
            conn.execute(audit_head.insert().values(id=1, last_id=0, last_hash=GENESIS))
        if conn.execute(sa.select(audit_base.c.id).where(audit_base.c.id == 1)).first() is None:
            conn.execute(audit_base.insert().values(id=1, first_id=1, prev_hash=GENESIS))


@dataclass(slots=True)
class _Pending:
    row: AuditRecord
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class AuditLog:
    """The append side: `await append(record)` returns once the record is committed (group commit)."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._closed = False
        self._sink = _ChainSink(engine)
        self._commit_lock = threading.Lock()  # the sink's one connection: one commit at a time
        # A SQLite commit is a local write with a bounded wait; a PostgreSQL one waits on the network, which must not
        # stall the event loop.
        self._inline = engine.dialect.name == "sqlite"
        self._checkpointer = _Checkpointer(engine, self._commit_lock) if self._inline else None
        self._thread = threading.Thread(target=self._writer, name="audit-writer", daemon=True)
        self._thread.start()
        self.batches = 0  # commits made; appended / batches is the group-commit factor
        self.appended = 0
        self.inline_commits = 0

    async def append(self, record: AuditRecord, *, alone: bool = False) -> int:
        """Commit `record` and return its id in the chain once the transaction has committed.

        `alone`: the caller has no concurrent appends to share a commit with, so a SQLite log commits at once on the
        caller's thread when the writer is idle and no other process holds the write lock; otherwise it queues.
        """
        if self._closed:
            raise AuditError("the audit log is closed")
        if alone and self._inline and self._queue.empty() and self._commit_lock.acquire(blocking=False):
            try:
                ids = self._sink.commit([record], wait=False)
            except _WriteLockBusy:
                pass  # another process is writing: the writer thread waits for it instead of this event loop
            except Exception as exc:
                raise AuditError(f"audit write failed: {exc}") from None
            else:
                self.batches += 1
                self.appended += 1
                self.inline_commits += 1
                if self._checkpointer is not None:
                    self._checkpointer.committed(1)
                return ids[0]
            finally:
                self._commit_lock.release()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.put(_Pending(record, loop, fut))
        return await fut

    async def close(self) -> None:
        """Write what is queued, then stop the writer."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        if self._checkpointer is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._checkpointer.close)
        self._engine.dispose()

    def _writer(self) -> None:
        sink = self._sink
        stop = False
        while not stop:
            item = self._queue.get()
            batch: list[_Pending] = []
            if item is None:
                stop = True
            else:
                batch.append(item)
            while len(batch) < _MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    batch.append(item)
            if not batch:
                continue
            try:
                with self._commit_lock:
                    ids = sink.commit([p.row for p in batch])
                    self.batches += 1
                    self.appended += len(batch)
                if self._checkpointer is not None:
                    self._checkpointer.committed(len(batch))
            except Exception as exc:  # the appenders learn it; the request then fails instead of going unaudited
                err = AuditError(f"audit write failed: {exc}")
                _resolve_all(batch, [None] * len(batch), err)
                continue
            _resolve_all(batch, ids, None)
        with self._commit_lock:
            sink.close()


@contextmanager
def _no_busy_wait(cur: Any) -> Iterator[None]:
    """SQLite statements on `cur` answer SQLITE_BUSY at once instead of waiting out the busy timeout."""
    cur.execute("PRAGMA busy_timeout=0")
    try:
        yield
    finally:
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


class _WriteLockBusy(Exception):
    """Another connection holds SQLite's write lock and the caller chose not to wait for it."""


class _ChainSink:
    """The writer thread's one database connection and its four statements, compiled once.

    The per-commit path runs on the DBAPI connection itself: SQLAlchemy's statement execution costs more CPU than the
    whole rest of a request, and the writer does nothing that needs it beyond the SQL text.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine
        self._pg = engine.dialect.name == "postgresql"
        ph = "%s" if self._pg else "?"
        cols = [c.name for c in audit_log.columns]
        self._cols = cols[:-2]  # all but prev_hash, hash (appended per row)
        self._insert = f"INSERT INTO audit_log ({', '.join(cols)}) VALUES ({', '.join([ph] * len(cols))})"
        self._head = "SELECT last_id, last_hash FROM audit_head WHERE id = 1" + (" FOR UPDATE" if self._pg else "")
        self._update = f"UPDATE audit_head SET last_id = {ph}, last_hash = {ph} WHERE id = 1"
        self._conn: Any = None

    def commit(self, records: list[AuditRecord], *, wait: bool = True) -> list[int]:
        """Append `records` in one transaction. `wait=False` (SQLite): raise _WriteLockBusy at once, with nothing
        written, when another connection holds the write lock, instead of waiting up to the busy timeout."""
        if self._conn is None:
            self._conn = self._engine.raw_connection()
            if not self._pg:  # waiting is the exception (`_begin`): two pragmas per commit cost ~15 µs
                self._conn.dbapi_connection.execute("PRAGMA busy_timeout=0")
        conn = self._conn.dbapi_connection  # the pool's wrapper forwards each call through __getattr__
        try:
            cur = conn.cursor()
            if not self._pg:
                self._begin(cur, wait)  # the write lock first: no other process can extend this head now
            cur.execute(self._head)
            last_id, last_hash = cur.fetchone()
            first = last_id + 1
            values = []
            for rec in records:
                last_id += 1
                row = _row_of(rec, last_id)
                row_hash = record_hash(last_hash, row)
                values.append((*(row[c] for c in self._cols), last_hash, row_hash))
                last_hash = row_hash
            cur.executemany(self._insert, values)
            cur.execute(self._update, (last_id, last_hash))
            cur.close()
            conn.commit()
        except _WriteLockBusy:
            raise  # nothing began: the connection is fine
        except Exception:
            self._discard()
            raise
        return list(range(first, last_id + 1))

    @staticmethod
    def _begin(cur: Any, wait: bool) -> None:
        """BEGIN IMMEDIATE; when another connection holds the write lock, wait up to the busy timeout for it, or
        raise _WriteLockBusy at once (`wait=False`)."""
        try:
            cur.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise
            if not wait:
                raise _WriteLockBusy() from None
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        try:
            cur.execute("BEGIN IMMEDIATE")
        finally:
            cur.execute("PRAGMA busy_timeout=0")

    def _discard(self) -> None:
        """Roll back and drop the connection: the next batch starts on a fresh one (a restarted database, say)."""
        conn, self._conn = self._conn, None
        try:
            conn.rollback()
        except Exception:
            pass
        try:
            conn.invalidate()
        except Exception:
            pass

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class _Checkpointer:
    """Checkpoints a SQLite log's WAL on its own thread and connection, so that no commit pays for one."""

    def __init__(self, engine: sa.Engine, commit_lock: threading.Lock) -> None:
        self._engine = engine
        self._commit_lock = commit_lock
        self._wake = threading.Event()
        self._stopping = False
        # Commits and records since the last checkpoint began; updated under the GIL, where a lost count only delays.
        self._commits = self._records = 0
        self.checkpoints = 0
        self._thread = threading.Thread(target=self._run, name="audit-checkpoint", daemon=True)
        self._thread.start()

    def committed(self, records: int) -> None:
        self._commits += 1
        self._records += records
        if self._commits >= CHECKPOINT_COMMITS or self._records >= CHECKPOINT_RECORDS:
            self._wake.set()

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        conn: Any = None
        while True:
            self._wake.wait(CHECKPOINT_IDLE_S)
            self._wake.clear()
            if self._stopping:
                break
            if not self._commits:
                continue
            self._commits = self._records = 0
            try:
                if conn is None:
                    conn = self._engine.raw_connection()
                self._checkpoint(conn)
                self.checkpoints += 1
            except Exception as exc:  # the backstop autocheckpoint still bounds the WAL; say why this one failed
                log.warning("audit WAL checkpoint failed: %s", exc)
                conn, old = None, conn
                if old is not None:
                    old.invalidate()
        if conn is not None:
            conn.close()

    def _checkpoint(self, conn: Any) -> None:
        cur = conn.cursor()
        try:
            if cur.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0]:
                return  # another connection is checkpointing
            # Commits made while the bulk was copied are left over, and a WAL never copied to its end never restarts
            # from its beginning: it grows, every commit an append, whose fsync costs more here than an overwrite's
            # (~400 vs ~240 µs p50 measured with SQLite on this disk). The tail is copied with this process's commits
            # held off, since SQLite's own wait for the write lock starves under a steady stream of group commits
            # (one RESTART waited 3.4 s while the WAL grew to 26,000 frames); it skips this round, not waiting, when
            # another process is writing or still reading old frames.
            with self._commit_lock, _no_busy_wait(cur):
                cur.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        finally:
            cur.close()


def _resolve_all(batch: list[_Pending], values: list[int | None], exc: BaseException | None) -> None:
    """Wake the appenders: one call into each event loop per batch, not one per record."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, int | None]]] = {}
    for p, v in zip(batch, values):
        by_loop.setdefault(p.loop, []).append((p.future, v))

    def wake(items: list[tuple[asyncio.Future, int | None]]) -> None:
        for fut, v in items:
            if fut.done():  # the appender was cancelled (client went away); the record is written regardless
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(v)

    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(wake, items)
        except RuntimeError:  # that loop has closed; nobody is waiting any more
            pass


def append_now(engine: sa.Engine, record: AuditRecord) -> int:
    """Commit one record on the caller's thread, waiting for the write lock like any appender: for the rare records
    that are not requests (audit_admin.py), written where no AuditLog runs (a CLI)."""
    sink = _ChainSink(engine)
    try:
        return sink.commit([record])[0]
    finally:
        sink.close()


def open_audit_log(db_url: str) -> AuditLog:
    """Open (creating if needed) the audit trail at `db_url`: sqlite:///path, a file path, or postgresql://..."""
    engine = make_engine(db_url)
    ensure_schema(engine)
    return AuditLog(engine)
