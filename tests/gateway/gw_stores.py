"""Fixtures for the quota and audit tests: a uniquely named PostgreSQL database and a Redis key prefix per test,
on the real local PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379). Imported by the test modules that use them.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).resolve().parent / "gw_workers.py"
PG_ADMIN = os.environ.get("SOVEREIGN_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SOVEREIGN_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def worker_cmd(*args: str) -> list[str]:
    return [sys.executable, str(WORKERS), *args]


@pytest.fixture()
def pg_url():
    """A fresh PostgreSQL database for this test, dropped afterwards."""
    import psycopg

    name = f"sov_audit_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture()
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'gateway.db'}"


@pytest.fixture()
def redis_prefix():
    """A key prefix of our own in the shared Redis, deleted afterwards."""
    import redis

    prefix = f"sovtest:{uuid.uuid4().hex[:12]}"
    yield prefix
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(f"{prefix}:*", count=1000))
    if keys:
        r.delete(*keys)
    r.close()


def request_records(db_url: str) -> list[dict]:
    """The audit records of API requests at `db_url`, in chain order: the trail's own records (status 0: changes
    to teams and keys, prunes) left out."""
    import io
    import json

    from gateway.audit_read import export

    buf = io.StringIO()
    export(db_url, buf)
    return [r for r in map(json.loads, buf.getvalue().splitlines()) if r["status"] != 0]
