"""The audit trail on real SQLite and real PostgreSQL: group commit, tamper detection, concurrency, crash safety."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa
from gw_stores import REPO, pg_url, sqlite_url, worker_cmd  # noqa: F401  (fixtures)
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gateway.audit import AuditRecord, canonical_json, open_audit_log, record_hash
from gateway.audit_read import export, verify, verify_jsonl
from sovereign.offline import offline_env


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request):
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


def rec(i: int, **kw) -> AuditRecord:
    base = dict(ts=time.time(), request_id=f"req-{i}", key_id="key-1", team="sales", model="SmolLM2-135M-Instruct",
                adapter="support@3" if i % 2 else None, status=200, prompt_tokens=10 + i, completion_tokens=i,
                latency_ms=12.5, ttft_ms=3.25, policy={"pii": "redact", "pii_found": {"PHONE": 1}, "injection": False},
                prompt="我的电话是 [PHONE]", completion=None)
    base.update(kw)
    return AuditRecord(**base)


def append_many(db_url: str, n: int) -> dict:
    async def go():
        log = open_audit_log(db_url)
        ids = await asyncio.gather(*(log.append(rec(i)) for i in range(n)))
        stats = {"ids": ids, "batches": log.batches, "appended": log.appended}
        await log.close()
        return stats

    return asyncio.run(go())


def execute(db_url: str, *statements: str) -> None:
    from gateway.audit import make_engine

    engine = make_engine(db_url)
    with engine.begin() as conn:
        for s in statements:
            conn.execute(sa.text(s))
    engine.dispose()


def test_concurrent_appends_share_commits_and_the_chain_verifies(db_url):
    stats = append_many(db_url, 300)
    assert sorted(stats["ids"]) == list(range(1, 301))
    assert stats["batches"] < 300  # group commit: concurrent appends shared transactions
    assert verify(db_url) == verify(db_url)
    result = verify(db_url)
    assert result.ok and result.count == 300 and result.first_bad_id is None, result


def test_appends_alone_commit_in_place_and_share_one_chain_with_queued_ones(db_url):
    async def go():
        log = open_audit_log(db_url)
        ids = [await log.append(rec(i), alone=True) for i in range(20)]
        ids += await asyncio.gather(*(log.append(rec(i)) for i in range(20, 120)))
        ids += [await log.append(rec(i), alone=True) for i in range(120, 130)]
        inline = log.inline_commits
        await log.close()
        return ids, inline

    ids, inline = asyncio.run(go())
    assert sorted(ids) == list(range(1, 131))
    # SQLite commits a lone append on the caller's thread; PostgreSQL always leaves it to the writer thread.
    assert inline == (30 if db_url.startswith("sqlite") else 0)
    result = verify(db_url)
    assert result.ok and result.count == 130, result


def test_an_append_alone_does_not_block_the_event_loop_on_another_processs_write_lock(sqlite_url):  # noqa: F811
    import sqlite3

    path = sqlite_url.removeprefix("sqlite:///")

    async def go():
        log = open_audit_log(sqlite_url)
        await log.append(rec(0), alone=True)
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock for 0.5 s
        loop = asyncio.get_running_loop()
        released = loop.create_future()

        def release():
            other.execute("COMMIT")
            other.close()
            released.set_result(loop.time())

        loop.call_later(0.5, release)  # runs only if the event loop is not stuck inside the append
        t0 = loop.time()
        rid = await asyncio.wait_for(log.append(rec(1), alone=True), timeout=30)
        waited = loop.time() - t0
        inline = log.inline_commits
        await log.close()
        return rid, waited, inline, released.result() - t0

    rid, waited, inline, released_after = asyncio.run(go())
    assert rid == 2 and inline == 1  # the second append queued for the writer thread instead
    assert released_after >= 0.45 and waited >= released_after - 0.05
    assert verify(sqlite_url).ok


@pytest.fixture
def frequent_checkpoints(monkeypatch):
    """Background checkpoints every 20 commits or 100 records, so a test sees several."""
    from gateway import audit

    monkeypatch.setattr(audit, "CHECKPOINT_COMMITS", 20)
    monkeypatch.setattr(audit, "CHECKPOINT_RECORDS", 100)


def test_sqlite_wal_is_checkpointed_in_the_background_and_started_over(sqlite_url, frequent_checkpoints):  # noqa: F811
    from gateway import audit

    wal = sqlite_url.removeprefix("sqlite:///") + "-wal"

    async def until_checkpointed(log, done: int) -> None:
        for _ in range(1000):
            if log._checkpointer.checkpoints > done:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"no background checkpoint after {done}")

    async def go():
        log = open_audit_log(sqlite_url)
        engine = audit.make_engine(sqlite_url)
        with engine.connect() as conn:  # committing connections leave checkpoints to the thread, bar a far backstop
            backstop = conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar()
        engine.dispose()
        n = 0
        for rnd in range(10):  # lone commits and group commits, each round past a threshold
            for _ in range(21):
                await log.append(rec(n), alone=True)
                n += 1
            await until_checkpointed(log, 2 * rnd)
            await asyncio.gather(*(log.append(rec(n + i)) for i in range(101)))
            n += 101
            await until_checkpointed(log, 2 * rnd + 1)
        wal_bytes = os.path.getsize(wal)
        thread = log._checkpointer._thread
        await log.close()
        return n, backstop, wal_bytes, thread

    n, backstop, wal_bytes, thread = asyncio.run(go())
    assert backstop == audit.BACKSTOP_PAGES
    # 210 lone commits alone write ~4 pages each: a WAL never started over would hold > 800 pages (3.3 MB);
    # restarted after every checkpoint it never holds more than one round's.
    assert wal_bytes < 1_500_000, wal_bytes
    assert not thread.is_alive() and not os.path.exists(wal)  # closed: the last connection folded the WAL in
    result = verify(sqlite_url)
    assert result.ok and result.count == n, result


def test_sqlite_wal_starts_over_under_a_steady_stream_of_group_commits(sqlite_url, frequent_checkpoints):  # noqa: F811
    wal = sqlite_url.removeprefix("sqlite:///") + "-wal"

    async def go():
        log = open_audit_log(sqlite_url)

        async def client(c: int) -> None:
            for i in range(100):
                await log.append(rec(c * 1000 + i))

        await asyncio.gather(*(client(c) for c in range(32)))
        wal_bytes, checkpoints = os.path.getsize(wal), log._checkpointer.checkpoints
        await log.close()
        return wal_bytes, checkpoints

    wal_bytes, checkpoints = asyncio.run(go())
    # Commits never pause here, so each checkpoint leaves frames behind; unless the tail is taken with commits held
    # off, the WAL never starts over and grows by every page written (5-6 MB for these 3,200 records, measured).
    assert checkpoints >= 5
    assert wal_bytes < 1_500_000, wal_bytes
    result = verify(sqlite_url)
    assert result.ok and result.count == 3200, result


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**80, max_value=2**80) | st.floats(allow_nan=False)
    | st.text(), lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES)
def test_canonical_json_is_byte_for_byte_what_every_chain_was_hashed_with(value):
    """Records hashed before the encoder was built once must still verify: the bytes may never change."""
    try:
        expected = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:  # infinity
        with pytest.raises(ValueError):
            canonical_json(value)
        return
    assert canonical_json(value) == expected


def test_canonical_json_refuses_what_json_refuses():
    with pytest.raises(ValueError):
        canonical_json({"latency_ms": float("nan")})
    with pytest.raises(TypeError):
        canonical_json({"when": object()})


def test_reopening_continues_the_chain(db_url):
    append_many(db_url, 5)
    append_many(db_url, 5)
    result = verify(db_url)
    assert result.ok and result.count == 10


def test_an_edited_record_fails_verify_naming_it(db_url):
    append_many(db_url, 20)
    execute(db_url, "UPDATE audit_log SET completion_tokens = 1 WHERE id = 7")
    result = verify(db_url)
    assert not result.ok and result.first_bad_id == 7 and "record 7 was modified" in result.reason
    assert result.count == 6


def test_an_edited_record_with_a_recomputed_hash_still_fails_at_the_next(db_url):
    append_many(db_url, 20)
    from gateway.audit import make_engine

    engine = make_engine(db_url)
    with engine.begin() as conn:
        row = dict(conn.execute(sa.text("SELECT * FROM audit_log WHERE id = 7")).mappings().one())
        row["status"] = 500
        new_hash = record_hash(row["prev_hash"], row)
        conn.execute(sa.text("UPDATE audit_log SET status = 500, hash = :h WHERE id = 7"), {"h": new_hash})
    engine.dispose()
    result = verify(db_url)
    assert not result.ok and result.first_bad_id == 8 and "does not link" in result.reason


def test_a_deleted_record_fails_verify_naming_the_gap(db_url):
    append_many(db_url, 20)
    execute(db_url, "DELETE FROM audit_log WHERE id = 11")
    result = verify(db_url)
    assert not result.ok and result.first_bad_id == 11 and "record 11 is missing" in result.reason


def test_records_cut_off_the_end_fail_verify(db_url):
    append_many(db_url, 20)
    execute(db_url, "DELETE FROM audit_log WHERE id >= 19")
    result = verify(db_url)
    assert not result.ok and result.first_bad_id == 19 and "19..20 are missing" in result.reason


def test_swapped_records_fail_verify_naming_the_first(db_url):
    append_many(db_url, 20)
    execute(db_url, "UPDATE audit_log SET id = -1 WHERE id = 5", "UPDATE audit_log SET id = 5 WHERE id = 6",
            "UPDATE audit_log SET id = 6 WHERE id = -1")
    result = verify(db_url)
    assert not result.ok and result.first_bad_id == 5, result


def test_export_writes_jsonl_that_verifies_on_its_own(db_url, tmp_path):
    append_many(db_url, 30)
    out = tmp_path / "audit.jsonl"
    assert export(db_url, out) == 30
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in lines] == list(range(1, 31))
    assert lines[0]["prompt"] == "我的电话是 [PHONE]" and lines[0]["policy"]["pii_found"] == {"PHONE": 1}
    assert lines[0]["time"].endswith("+00:00")
    assert verify_jsonl(out).ok
    # An auditor's copy is tamper-evident too.
    lines[3]["status"] = 404
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    result = verify_jsonl(bad)
    assert not result.ok and result.first_bad_id == 4


def test_export_since_filters_by_time(sqlite_url):  # noqa: F811
    async def go():
        log = open_audit_log(sqlite_url)
        for i in range(10):
            await log.append(rec(i, ts=1_700_000_000.0 + i * 3600))
        await log.close()

    asyncio.run(go())
    buf = io.StringIO()
    assert export(sqlite_url, buf, since="2023-11-14T23:00:00Z") == 9  # record 0 is at 22:13:20 UTC
    assert export(sqlite_url, io.StringIO(), since=1_700_000_000.0 + 5 * 3600) == 5


def test_export_since_is_a_contiguous_piece_of_the_chain_that_verifies_against_its_anchor(sqlite_url, tmp_path):  # noqa: F811
    # Records are written when requests end: record 3 is a long request that arrived before the cut-off, among later
    # ones. It is exported with them, or the piece would have a hole no verifier could tell from a deletion.
    arrivals = [0, 1, 2, 0.5, 3, 4, 5]
    async def go():
        log = open_audit_log(sqlite_url)
        for i, hours in enumerate(arrivals):
            await log.append(rec(i, ts=1_700_000_000.0 + hours * 3600))
        await log.close()

    asyncio.run(go())
    full, piece = tmp_path / "full.jsonl", tmp_path / "piece.jsonl"
    export(sqlite_url, full)
    assert export(sqlite_url, piece, since=1_700_000_000.0 + 1 * 3600) == 6
    ids = [json.loads(line)["id"] for line in piece.read_text().splitlines()]
    assert ids == [2, 3, 4, 5, 6, 7]
    result = verify_jsonl(piece)
    assert result.ok and result.count == 6 and "records 2..7" in result.reason and "earlier export" in result.reason
    anchor = json.loads(full.read_text().splitlines()[0])["hash"]
    assert verify_jsonl(piece, anchor).ok
    wrong = verify_jsonl(piece, "f" * 64)
    assert not wrong.ok and wrong.first_bad_id == 2 and "anchor" in wrong.reason
    lines = piece.read_text().splitlines()
    del lines[2]
    piece.write_text("\n".join(lines) + "\n")
    holed = verify_jsonl(piece, anchor)
    assert not holed.ok and holed.first_bad_id == 4 and "missing" in holed.reason
    assert export(sqlite_url, io.StringIO(), since=1_700_000_000.0 + 99 * 3600) == 0


@pytest.mark.parametrize("line", [b"[1]\n", b"{}\n", b'{"id": "1"}\n', b"\xff\xfe\n", b"not json\n"])
def test_a_file_that_is_not_an_export_is_refused_with_its_line(tmp_path, line):
    from gateway.audit import AuditError

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(line)
    with pytest.raises(AuditError, match=r"bad.jsonl:1: not an audit export line") as err:
        verify_jsonl(bad)
    assert err.value.code == "invalid_export"


def test_sqlite_audit_commits_write_no_index_pages(sqlite_url, pg_url):  # noqa: F811
    # Each index is one more WAL page in every lone record's fsynced commit; PostgreSQL shares commits and keeps its.
    execute(sqlite_url, "CREATE TABLE audit_log (id INTEGER PRIMARY KEY, ts FLOAT, request_id VARCHAR(128))",
            "CREATE INDEX ix_audit_log_ts ON audit_log (ts)", "CREATE INDEX ix_audit_log_request_id ON audit_log "
            "(request_id)")  # a trail from before: its indexes go when it is opened
    asyncio.run(open_audit_log(sqlite_url).close())
    assert not sa.inspect(sa.create_engine(sqlite_url)).get_indexes("audit_log")
    asyncio.run(open_audit_log(pg_url).close())
    names = {ix["name"] for ix in sa.inspect(sa.create_engine(pg_url)).get_indexes("audit_log")}
    assert names == {"ix_audit_log_ts", "ix_audit_log_request_id"}


def test_verify_an_empty_or_missing_trail(sqlite_url, tmp_path):  # noqa: F811
    result = verify(f"sqlite:///{tmp_path / 'nothing.db'}")
    assert not result.ok and "no audit trail" in result.reason
    asyncio.run(open_audit_log(sqlite_url).close())
    assert verify(sqlite_url).ok and verify(sqlite_url).count == 0


def audit_app():
    """`sovereign audit ...` as the root app registers it."""
    import typer

    from gateway.audit_cli import register_audit

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    register_audit(app)
    return app


def test_audit_cli_verify_and_export(sqlite_url, tmp_path):  # noqa: F811
    app = audit_app()
    runner = CliRunner()
    append_many(sqlite_url, 12)
    ok = runner.invoke(app, ["audit", "verify", "--database-url", sqlite_url])
    assert ok.exit_code == 0 and "12 records, chain intact" in ok.output
    out = tmp_path / "x.jsonl"
    exp = runner.invoke(app, ["audit", "export", "--database-url", sqlite_url, "-o", str(out)])
    assert exp.exit_code == 0 and len(out.read_text().splitlines()) == 12
    execute(sqlite_url, "UPDATE audit_log SET team = 'other' WHERE id = 3")
    bad = runner.invoke(app, ["audit", "verify", "--database-url", sqlite_url])
    assert bad.exit_code == 1 and "record 3" in bad.output
    since = runner.invoke(app, ["audit", "export", "--database-url", sqlite_url, "--since", "last week"])
    assert since.exit_code == 2 and "invalid_since" in since.output
    fine = runner.invoke(app, ["audit", "verify", "--file", str(out)])
    assert fine.exit_code == 0 and "12 records, chain intact" in fine.output
    lines = out.read_text().splitlines()
    anchor = json.loads(lines[3])["hash"]
    out.write_text("\n".join(lines[4:]) + "\n")  # what `export --since` writes: records 5..12
    piece = runner.invoke(app, ["audit", "verify", "--file", str(out), "--anchor", anchor])
    assert piece.exit_code == 0 and "records 5..12" in piece.output and "given anchor" in piece.output
    unpinned = runner.invoke(app, ["audit", "verify", "--anchor", anchor])
    assert unpinned.exit_code == 2 and "--file" in unpinned.output
    out.write_text("garbage\n")
    garbage = runner.invoke(app, ["audit", "verify", "--file", str(out)])
    assert garbage.exit_code == 2 and "invalid_export" in garbage.output


def test_two_processes_appending_concurrently_keep_one_valid_chain(db_url):
    procs = [subprocess.Popen(worker_cmd("audit-append", db_url, tag, "300", "16"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=offline_env(), cwd=REPO) for tag in ("a", "b")]
    acked = set()
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        acked |= {line.split()[1] for line in out.splitlines() if line.startswith("ACK")}
    assert len(acked) == 600
    result = verify(db_url)
    assert result.ok and result.count == 600, result
    from gateway.audit import make_engine

    engine = make_engine(db_url, writer=False)
    with engine.connect() as conn:
        stored = {r[0] for r in conn.execute(sa.text("SELECT request_id FROM audit_log"))}
    engine.dispose()
    assert stored == acked


def test_sigkill_while_appending_loses_no_acknowledged_record(db_url):
    acked: set[str] = set()
    for round_ in range(3):
        p = subprocess.Popen(worker_cmd("audit-append", db_url, f"r{round_}", str(10**9), "32"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=offline_env(), cwd=REPO)
        seen = 0
        kill_after = 150 + 97 * round_
        for line in p.stdout:
            if line.startswith("ACK"):
                acked.add(line.split()[1])
                seen += 1
                if seen >= kill_after:
                    break
        assert seen >= kill_after, p.stderr.read()
        os.kill(p.pid, signal.SIGKILL)  # mid-flight: batches are being written right now
        rest, _ = p.communicate(timeout=60)
        acked |= {line.split()[1] for line in rest.splitlines() if line.startswith("ACK")}
        assert p.returncode == -signal.SIGKILL
    result = verify(db_url)
    assert result.ok, result
    from gateway.audit import make_engine

    engine = make_engine(db_url, writer=False)
    with engine.connect() as conn:
        stored = {r[0] for r in conn.execute(sa.text("SELECT request_id FROM audit_log"))}
    engine.dispose()
    assert acked <= stored, f"{len(acked - stored)} acknowledged records lost"
    assert result.count == len(stored)


def test_sqlite_synchronous_normal_is_an_opt_in_and_a_bad_value_is_refused(tmp_path):
    from gateway.audit import AuditError, make_engine

    url = f"sqlite:///{tmp_path / 'sub' / 'fast.db'}?synchronous=normal"
    append_many(url, 10)
    assert verify(url).ok and verify(url).count == 10
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    engine.dispose()
    engine = make_engine(f"sqlite:///{tmp_path / 'sub' / 'fast.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL, the default
    engine.dispose()
    with pytest.raises(AuditError, match="synchronous must be"):
        make_engine(f"sqlite:///{tmp_path / 'x.db'}?synchronous=off")


def test_sovereign_audit_cli_through_the_real_command(sqlite_url, tmp_path):  # noqa: F811
    append_many(sqlite_url, 7)
    env = offline_env(SOVEREIGN_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sovereign.cli", "audit", *args], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    ok = cli("verify", "--database-url", sqlite_url)
    assert ok.returncode == 0 and "7 records, chain intact" in ok.stdout, ok.stderr
    out = tmp_path / "export.jsonl"
    exp = cli("export", "--database-url", sqlite_url, "--out", str(out))
    assert exp.returncode == 0 and len(out.read_text().splitlines()) == 7, exp.stderr
    execute(sqlite_url, "DELETE FROM audit_log WHERE id = 4")
    bad = cli("verify", "--database-url", sqlite_url)
    assert bad.returncode == 1 and "record 4 is missing" in bad.stderr
    env["SOVEREIGN_GATEWAY_DATABASE_URL"] = sqlite_url  # the gateway's own variable is the default
    assert cli("verify").returncode == 1


def test_usage_sums_requests_errors_and_tokens_per_team_model_day_and_month(db_url):
    """What each team was charged, from the trail: the same sums on SQLite and PostgreSQL, days and months in UTC."""
    from datetime import UTC, datetime

    from gateway.audit_usage import usage

    def at(text: str) -> float:
        return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()

    records = [rec(1, ts=at("2026-11-30T23:59:59"), team="sales", prompt_tokens=10, completion_tokens=5),
               rec(2, ts=at("2026-12-01T00:00:00"), team="sales", prompt_tokens=7, completion_tokens=3),
               rec(3, ts=at("2026-12-01T12:00:00"), team="sales", status=429, prompt_tokens=0, completion_tokens=0),
               rec(4, ts=at("2026-12-02T08:00:00"), team="support", model="other", prompt_tokens=100,
                   completion_tokens=50),
               rec(5, ts=at("2026-12-02T09:00:00"), team="support", status=499, prompt_tokens=20,
                   completion_tokens=4)]

    async def write():
        log = open_audit_log(db_url)
        for r in records:
            await log.append(r)
        await log.close()

    asyncio.run(write())
    rows = {tuple(u.group.values()): u for u in usage(db_url, ["team"])}
    assert (rows[("sales",)].requests, rows[("sales",)].errors, rows[("sales",)].total_tokens) == (3, 1, 25)
    assert (rows[("support",)].requests, rows[("support",)].errors, rows[("support",)].prompt_tokens,
            rows[("support",)].completion_tokens) == (2, 1, 120, 54)
    by_day = [(u.group["day"], u.group["team"], u.requests, u.total_tokens) for u in usage(db_url, ["day", "team"])]
    assert by_day == [("2026-11-30", "sales", 1, 15), ("2026-12-01", "sales", 2, 10), ("2026-12-02", "support", 2, 174)]
    by_month = [(u.group["month"], u.requests, u.total_tokens) for u in usage(db_url, ["month"])]
    assert by_month == [("2026-11", 1, 15), ("2026-12", 4, 184)]
    december = usage(db_url, ["model"], since=at("2026-12-01T00:00:00"), until=at("2026-12-02T08:00:00"))
    assert [(u.group["model"], u.requests) for u in december] == [("SmolLM2-135M-Instruct", 2)]
    assert [u.requests for u in usage(db_url, [])] == [5]
    assert usage(db_url, [], since=at("2027-01-01T00:00:00")) == []
    by_key = {u.group["key"]: u for u in usage(db_url, ["key"])}  # which key was used last, and when
    assert by_key["key-1"].last_request_at == at("2026-12-02T09:00:00")
    assert by_key["key-1"].as_dict()["last_request_at"] == "2026-12-02T09:00:00+00:00"


def test_audit_cli_usage_prints_a_table_with_a_total_json_and_clear_refusals(sqlite_url):  # noqa: F811
    from datetime import datetime

    app = audit_app()
    runner = CliRunner()
    append_many(sqlite_url, 4)  # team sales; prompt 10..13, completion 0..3
    table = runner.invoke(app, ["audit", "usage", "--by", "team,adapter", "--database-url", sqlite_url])
    assert table.exit_code == 0 and "support@3" in table.output and "total" in table.output
    assert "52" in table.output  # the total tokens of all four: 46 prompt + 6 completion
    before = time.time()
    rows = json.loads(runner.invoke(app, ["audit", "usage", "--json", "--database-url", sqlite_url]).output)
    last = rows[0].pop("last_request_at")
    assert rows == [{"group": {"team": "sales"}, "requests": 4, "errors": 0, "prompt_tokens": 46,
                     "completion_tokens": 6, "total_tokens": 52}]
    assert before - 60 < datetime.fromisoformat(last).timestamp() <= before
    bad = runner.invoke(app, ["audit", "usage", "--by", "teams", "--database-url", sqlite_url])
    assert bad.exit_code == 2 and "invalid_group" in bad.output and "team, key, model" in bad.output
    until = runner.invoke(app, ["audit", "usage", "--until", "tomorrow", "--database-url", sqlite_url])
    assert until.exit_code == 2 and "invalid_until" in until.output


def test_verify_while_another_process_appends_reads_one_snapshot(db_url):
    """PostgreSQL's default isolation gives each statement its own snapshot: the head read first, then rows that
    went on growing, made `verify` fail on a healthy trail that a gateway was writing to."""
    append_many(db_url, 50)
    p = subprocess.Popen(worker_cmd("audit-append", db_url, "live", str(10**9), "8"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=offline_env(), cwd=REPO)
    try:
        seen = 0
        for line in p.stdout:  # appending has begun
            seen += line.startswith("ACK")
            if seen >= 50:
                break
        results = [verify(db_url) for _ in range(5)]
    finally:
        os.kill(p.pid, signal.SIGTERM)
        p.communicate(timeout=60)
    assert all(r.ok for r in results), [r.reason for r in results if not r.ok]
    assert results[-1].count > results[0].count >= 100
