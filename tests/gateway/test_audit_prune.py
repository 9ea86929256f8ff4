"""`audit prune`: old records leave the database for an archive, in the open, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa
from gw_stores import REPO, pg_url, sqlite_url, worker_cmd  # noqa: F401  (fixtures)
from test_audit import audit_app, execute, rec
from typer.testing import CliRunner

from gateway import audit_prune
from gateway.audit import AuditError, make_engine, open_audit_log
from gateway.audit_read import export, verify, verify_jsonl
from gateway.audit_usage import usage
from sovereign.offline import offline_env

DAY = 86_400.0
T0 = 1_760_000_000.0  # 2025-10-09: every record here is long past


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request):
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


def append_days(db_url: str, days: range) -> None:
    """One record a day, arriving at T0 + day."""
    async def go():
        log = open_audit_log(db_url)
        for d in days:
            await log.append(rec(d, ts=T0 + d * DAY, request_id=f"day-{d}"))
        await log.close()

    asyncio.run(go())


def rows(db_url: str, where: str = "1=1") -> list[dict]:
    engine = make_engine(db_url, writer=False)
    with engine.connect() as conn:
        out = [dict(r) for r in conn.execute(sa.text(f"SELECT * FROM audit_log WHERE {where} ORDER BY id")).mappings()]
    engine.dispose()
    return out


def test_prune_archives_deletes_and_the_chain_still_verifies(db_url, tmp_path):
    append_days(db_url, range(30))
    archive = tmp_path / "archive" / "audit-2025.jsonl"
    result = audit_prune.prune(db_url, T0 + 20 * DAY, archive)
    assert result.plan.first_id == 1 and result.plan.through == 20 and result.declared_in == 31
    # The archive is an export of records 1..20 that verifies on its own, and its digest is the one declared.
    lines = [json.loads(line) for line in archive.read_text(encoding="utf-8").splitlines()]
    assert [r["request_id"] for r in lines] == [f"day-{d}" for d in range(20)]
    assert verify_jsonl(archive).ok and verify_jsonl(archive).count == 20
    assert archive.stat().st_mode & 0o777 == 0o600
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == result.archive_sha256
    assert lines[-1]["hash"] == result.last_hash
    left = rows(db_url)
    assert [r["id"] for r in left] == list(range(21, 32))
    decl = json.loads(left[-1]["policy"])["audit_prune"]
    assert left[-1]["status"] == 0 and left[-1]["key_id"] is None
    assert decl["through"] == 20 and decl["records"] == 20 and decl["last_hash"] == result.last_hash
    assert decl["archive"] == "audit-2025.jsonl" and decl["archive_sha256"] == result.archive_sha256
    checked = verify(db_url)
    assert checked.ok and checked.count == 11, checked
    assert "records 1..20 were pruned (declared in record 31)" in checked.reason
    # What is left exports as a piece that links to the archive's last hash.
    rest = tmp_path / "rest.jsonl"
    assert export(db_url, rest) == 11
    assert verify_jsonl(rest, anchor=result.last_hash).ok
    # Chargeback counts requests only, not the trail's own record.
    assert sum(u.requests for u in usage(db_url, [])) == 10
    # The trail goes on: a gateway appends after the prune, and the chain still verifies.
    append_days(db_url, range(30, 32))
    assert verify(db_url).ok and verify(db_url).count == 13


def test_a_second_prune_continues_the_first_and_its_archive_links_to_the_first(db_url, tmp_path):
    append_days(db_url, range(30))
    first = audit_prune.prune(db_url, T0 + 10 * DAY, tmp_path / "a.jsonl")
    second = audit_prune.prune(db_url, T0 + 25 * DAY, tmp_path / "b.jsonl")
    assert (second.plan.first_id, second.plan.through) == (11, 25)
    assert not verify_jsonl(tmp_path / "b.jsonl", anchor="0" * 64).ok
    piece = verify_jsonl(tmp_path / "b.jsonl", anchor=first.last_hash)
    assert piece.ok and piece.count == 15 and "records 11..25" in piece.reason
    checked = verify(db_url)
    # Left: days 25..29 (ids 26..30) and both declarations (31, 32), which arrived now.
    assert checked.ok and checked.count == 7 and "1..25 were pruned (declared in record 32)" in checked.reason


def test_records_deleted_and_the_start_moved_without_a_prune_fail_verify(db_url):
    append_days(db_url, range(20))
    h10 = rows(db_url, "id = 10")[0]["hash"]
    execute(db_url, "DELETE FROM audit_log WHERE id <= 10",
            f"UPDATE audit_base SET first_id = 11, prev_hash = '{h10}' WHERE id = 1")
    checked = verify(db_url)
    assert not checked.ok and checked.first_bad_id == 1
    assert "record 1..10 is missing" in checked.reason and "no prune record" in checked.reason


def test_records_deleted_past_what_a_prune_declared_fail_verify(db_url, tmp_path):
    append_days(db_url, range(20))
    audit_prune.prune(db_url, T0 + 5 * DAY, tmp_path / "a.jsonl")  # records 1..5
    h8 = rows(db_url, "id = 8")[0]["hash"]
    execute(db_url, "DELETE FROM audit_log WHERE id <= 8",
            f"UPDATE audit_base SET first_id = 9, prev_hash = '{h8}' WHERE id = 1")
    checked = verify(db_url)
    assert not checked.ok and "no prune record in it declares" in checked.reason


def test_a_start_that_is_not_the_declared_hash_fails_verify(sqlite_url, tmp_path):  # noqa: F811
    append_days(sqlite_url, range(10))
    audit_prune.prune(sqlite_url, T0 + 5 * DAY, tmp_path / "a.jsonl")
    execute(sqlite_url, f"UPDATE audit_base SET prev_hash = '{'1' * 64}' WHERE id = 1")
    checked = verify(sqlite_url)
    assert not checked.ok and checked.first_bad_id == 6 and "does not link" in checked.reason


def test_a_broken_chain_is_never_pruned(db_url, tmp_path):
    append_days(db_url, range(20))
    execute(db_url, "UPDATE audit_log SET completion_tokens = 0 WHERE id = 3")
    with pytest.raises(AuditError) as err:
        audit_prune.prune(db_url, T0 + 10 * DAY, tmp_path / "archive" / "a.jsonl")
    assert err.value.code == "chain_broken" and "record 3 was modified" in str(err.value)
    assert len(rows(db_url)) == 20 and not (tmp_path / "archive").exists()


def test_refusals_a_time_to_come_an_existing_archive_and_nothing_to_prune(sqlite_url, tmp_path):  # noqa: F811
    append_days(sqlite_url, range(5))
    with pytest.raises(AuditError) as err:
        audit_prune.prune(sqlite_url, time.time() + 3600, tmp_path / "a.jsonl")
    assert err.value.code == "invalid_before"
    (tmp_path / "a.jsonl").write_text("an auditor's copy\n")
    with pytest.raises(AuditError) as err:
        audit_prune.prune(sqlite_url, T0 + 3 * DAY, tmp_path / "a.jsonl")
    assert err.value.code == "archive_exists" and (tmp_path / "a.jsonl").read_text() == "an auditor's copy\n"
    assert audit_prune.prune(sqlite_url, T0 - DAY, tmp_path / "b.jsonl") is None
    assert not (tmp_path / "b.jsonl").exists() and len(rows(sqlite_url)) == 5


def test_a_prune_cut_short_leaves_a_chain_that_verifies_and_can_be_finished(db_url, tmp_path, monkeypatch):
    append_days(db_url, range(30))
    monkeypatch.setattr(audit_prune, "CHUNK", 4)

    def stop_after_two_chunks(done: int, total: int) -> None:
        if done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        audit_prune.prune(db_url, T0 + 20 * DAY, tmp_path / "a.jsonl", stop_after_two_chunks)
    checked = verify(db_url)
    assert checked.ok and "1..8 were pruned" in checked.reason, checked
    start_hash = rows(db_url, "id = 9")[0]["prev_hash"]
    again = audit_prune.prune(db_url, T0 + 20 * DAY, tmp_path / "b.jsonl")
    assert (again.plan.first_id, again.plan.through) == (9, 20)
    assert verify_jsonl(tmp_path / "b.jsonl", anchor=start_hash).ok
    checked = verify(db_url)
    assert checked.ok and "1..20 were pruned" in checked.reason, checked


def test_gateways_go_on_appending_while_a_prune_deletes(db_url, tmp_path, monkeypatch):
    append_days(db_url, range(200))
    monkeypatch.setattr(audit_prune, "CHUNK", 10)
    p = subprocess.Popen(worker_cmd("audit-append", db_url, "live", str(10**9), "8"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=offline_env(), cwd=REPO)
    acked: set[str] = set()
    try:
        for line in p.stdout:  # the appender is committing before the prune starts
            if line.startswith("ACK"):
                acked.add(line.split()[1])
                if len(acked) >= 50:
                    break
        result = audit_prune.prune(db_url, T0 + 150 * DAY, tmp_path / "a.jsonl")
    finally:
        os.kill(p.pid, signal.SIGTERM)
        rest, err = p.communicate(timeout=60)
    acked |= {line.split()[1] for line in rest.splitlines() if line.startswith("ACK")}
    assert result.plan.through == 150
    stored = {r["request_id"] for r in rows(db_url)}
    assert acked <= stored, f"{len(acked - stored)} acknowledged records lost"
    checked = verify(db_url)
    assert checked.ok and "1..150 were pruned" in checked.reason, checked
    assert verify_jsonl(tmp_path / "a.jsonl").count == 150


def test_audit_cli_prune(sqlite_url, tmp_path):  # noqa: F811
    app = audit_app()
    runner = CliRunner()
    append_days(sqlite_url, range(10))
    db = ["--database-url", sqlite_url]
    neither = runner.invoke(app, ["audit", "prune", *db, "--before", "2025-10-14"])
    assert neither.exit_code == 2 and "--no-archive" in neither.output
    dry = runner.invoke(app, ["audit", "prune", *db, "--before", "2025-10-14", "--dry-run"])
    assert dry.exit_code == 0 and "would prune records 1..5 (5, arrived 2025-10-09" in dry.output, dry.output
    out = tmp_path / "a.jsonl"
    declined = runner.invoke(app, ["audit", "prune", *db, "--before", "2025-10-14", "--archive", str(out)], input="n\n")
    assert declined.exit_code == 1 and len(rows(sqlite_url)) == 10 and not out.exists()
    done = runner.invoke(app, ["audit", "prune", *db, "--before", "2025-10-14", "--archive", str(out), "--yes"])
    assert done.exit_code == 0, done.output
    assert "pruned records 1..5" in done.output and "Record 11 declares the prune" in done.output
    assert f"audit verify --file {out}" in done.output
    ok = runner.invoke(app, ["audit", "verify", *db])
    assert ok.exit_code == 0 and "records 1..5 were pruned" in ok.output
    gone = runner.invoke(app, ["audit", "prune", *db, "--before", "2025-10-16", "--no-archive", "--yes"])
    assert gone.exit_code == 0 and "pruned records 6..7" in gone.output and "archived" not in gone.output
    decl = json.loads(rows(sqlite_url)[-1]["policy"])["audit_prune"]
    assert decl["archive"] is None and decl["archive_sha256"] is None and decl["through"] == 7
    future = runner.invoke(app, ["audit", "prune", *db, "--before", "2099-01-01", "--no-archive", "--yes"])
    assert future.exit_code == 2 and "invalid_before" in future.output
    # For a schedule: a span instead of a date, and a folder that names each archive by its records.
    both = runner.invoke(app, ["audit", "prune", *db, "--before", "2025-10-16", "--older-than", "1d", "--no-archive"])
    assert both.exit_code == 2 and "--older-than" in both.output
    bad = runner.invoke(app, ["audit", "prune", *db, "--older-than", "a year", "--no-archive", "--yes"])
    assert bad.exit_code == 2 and "400d" in bad.output
    two = runner.invoke(app, ["audit", "prune", *db, "--older-than", "1d", "--no-archive", "--archive-dir",
                              str(tmp_path)])
    assert two.exit_code == 2 and "one of --archive" in two.output
    scheduled = runner.invoke(app, ["audit", "prune", *db, "--older-than", "1d", "--archive-dir",
                                    str(tmp_path / "vault"), "--yes"])
    assert scheduled.exit_code == 0, scheduled.output
    # Records 8..10 arrived in 2025, the two declarations (11, 12) today: 8..10 go.
    assert "pruned records 8..10" in scheduled.output
    assert verify_jsonl(tmp_path / "vault" / "audit-8-10.jsonl").count == 3
    again = runner.invoke(app, ["audit", "prune", *db, "--older-than", "1d", "--archive-dir", str(tmp_path / "vault"),
                                "--yes"])
    assert again.exit_code == 0 and "nothing to prune" in again.output
    assert verify(sqlite_url).ok


def test_sovereign_audit_prune_through_the_real_command(sqlite_url, tmp_path):  # noqa: F811
    append_days(sqlite_url, range(6))
    env = offline_env(SOVEREIGN_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO),
                      SOVEREIGN_GATEWAY_DATABASE_URL=sqlite_url)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sovereign.cli", "audit", *args], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    archive = tmp_path / "a.jsonl"
    done = cli("prune", "--before", "2025-10-12", "--archive", str(archive), "--yes")
    assert done.returncode == 0 and "pruned records 1..3" in done.stdout, done.stderr
    assert "3 records, chain intact" in cli("verify", "--file", str(archive)).stdout
    ok = cli("verify")
    assert ok.returncode == 0 and "records 1..3 were pruned (declared in record 7)" in ok.stdout, ok.stderr
