"""The gateway's tables (teams, API keys, a change counter) on SQLite or PostgreSQL, through SQLAlchemy.

Only admin paths (admin API, `sovereign keys|teams`, the directory refresher) touch these tables; the request path
reads the in-memory `Directory`. Every write bumps `gateway_meta.directory_generation` in the same transaction, so
refreshers poll one row and reload only when something changed.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Engine, ForeignKey, Integer, String, create_engine, event,
                        inspect, text, update)
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

GENERATION = "directory_generation"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Team(Base):
    __tablename__ = "gateway_teams"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    allowed_models: Mapped[list] = mapped_column(JSON, default=lambda: ["*"])  # glob patterns over model ids
    max_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pii: Mapped[str] = mapped_column(String(8), default="off")  # off | redact | block
    injection: Mapped[str] = mapped_column(String(8), default="flag")  # off | flag | block
    audit_content: Mapped[str] = mapped_column(String(10), default="hash")  # none | hash | redacted
    requests_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tokens_per_minute: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    daily_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    monthly_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class ApiKey(Base):
    __tablename__ = "gateway_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    team: Mapped[str] = mapped_column(String(64), ForeignKey("gateway_teams.name"), index=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the secret; never the secret
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings so a person can tell keys apart
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tokens_per_minute: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    daily_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    monthly_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    allowed_networks: Mapped[list | None] = mapped_column(JSON, nullable=True)  # CIDRs; None: from anywhere


class Meta(Base):
    __tablename__ = "gateway_meta"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[int] = mapped_column(Integer, default=0)


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL and a busy timeout so the CLI can write while a gateway reads."""
    if "://" not in url or url.startswith("sqlite"):
        if "://" not in url:
            url = f"sqlite:///{url}"
        from pathlib import Path

        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _):  # pragma: no cover - exercised by every SQLite test
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    from gateway.audit import normalize_url  # postgresql:// means psycopg 3 here, as in the audit trail

    return create_engine(normalize_url(url), pool_pre_ping=True, pool_size=2, max_overflow=4)


def init_db(engine: Engine) -> None:
    """Create the tables and the change counter if missing, and the columns a later release added; safe when several
    gateways start at once."""
    for attempt in range(5):
        try:
            Base.metadata.create_all(engine)
            _add_new_columns(engine)
            with Session(engine) as s, s.begin():
                if s.get(Meta, GENERATION) is None:
                    s.add(Meta(name=GENERATION, value=0))
            return
        except (IntegrityError, ProgrammingError, OperationalError):
            # Another process created the same table or row between our check and our insert.
            if attempt == 4:
                raise
            import time

            time.sleep(0.2 * (attempt + 1))


def _add_new_columns(engine: Engine) -> None:
    """Columns added to a table after its first release (all nullable: rows written before mean "not set"), added to a
    database an earlier release created. create_all makes missing tables only."""
    insp = inspect(engine)
    for table in Base.metadata.sorted_tables:
        have = {c["name"] for c in insp.get_columns(table.name)}
        for column in table.columns:
            if column.name not in have and column.nullable:
                kind = column.type.compile(dialect=engine.dialect)
                with engine.begin() as conn:  # a racing gateway's ADD raises here; init_db's retry then finds it
                    conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}'))


def bump_generation(session: Session) -> None:
    session.execute(update(Meta).where(Meta.name == GENERATION).values(value=Meta.value + 1))


def read_generation(engine: Engine) -> int:
    with engine.connect() as conn:
        value = conn.execute(Meta.__table__.select().where(Meta.name == GENERATION)).first()
    return int(value.value) if value is not None else 0
