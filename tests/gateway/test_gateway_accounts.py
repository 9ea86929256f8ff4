"""Keys and teams: the admin API and the `sovereign keys|teams` CLI, checked through a running gateway."""

from __future__ import annotations

import io
import json
import re
import time

import httpx
import openai
import pytest

from gateway.accounts import hash_secret
from tests.conftest import run_sovereign
from tests.gateway.gw_stores import pg_url, sqlite_url  # noqa: F401  (fixtures)

USER = [{"role": "user", "content": "hello"}]


def wait_for(check, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except (AssertionError, openai.APIError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def refused_attempts(gw, key_id: str) -> list[dict]:
    """The audit records of calls refused (401) with this key."""
    from gateway.audit_read import export

    out = io.StringIO()
    export(gw.app.config.resolved_database_url(), out)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    return [r for r in rows if r["key_id"] == key_id and r["status"] == 401]


def test_admin_api_creates_team_and_key_and_revokes_it(gw):
    admin = httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {gw.admin_key}"})
    r = admin.post("/admin/teams", json={"name": "sales", "allowed_models": ["fake-model"], "max_tokens": 64,
                                         "pii": "redact", "requests_per_minute": 100})
    assert r.status_code == 201 and r.json()["pii"] == "redact"
    r = admin.post("/admin/keys", json={"team": "sales", "name": "crm"})
    assert r.status_code == 201
    created = r.json()
    secret, key_id = created["secret"], created["id"]
    assert secret.startswith("sk-sov-") and len(secret) > 40
    assert gw.client(secret).chat.completions.create(model="fake-model", messages=USER).choices
    listed = admin.get("/admin/keys", params={"team": "sales"}).json()
    assert [k["id"] for k in listed] == [key_id] and "secret" not in listed[0]
    assert secret not in admin.get("/admin/keys").text
    assert admin.post(f"/admin/keys/{key_id}/revoke").json()["revoked_at"]
    with pytest.raises(openai.AuthenticationError):
        gw.client(secret).chat.completions.create(model="fake-model", messages=USER)


def test_a_revoked_key_says_so_and_its_attempts_are_audited_under_its_key(gw):
    """After a revocation, the app (or whoever found the leaked key) still calling with it is in the trail."""
    admin = httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {gw.admin_key}"})
    assert admin.post("/admin/teams", json={"name": "leaky", "allowed_models": ["fake-model"]}).status_code == 201
    created = admin.post("/admin/keys", json={"team": "leaky", "name": "old-crm"}).json()
    revoked_at = admin.post(f"/admin/keys/{created['id']}/revoke").json()["revoked_at"]
    client = gw.client(created["secret"])

    def refused_as_revoked():
        with pytest.raises(openai.AuthenticationError) as refused:
            client.chat.completions.create(model="fake-model", messages=USER)
        assert f"This API key ({created['id']}) was revoked at {revoked_at[:19]}" in refused.value.body["message"]

    wait_for(refused_as_revoked)
    with pytest.raises(openai.AuthenticationError, match="was revoked at"):
        client.files.list()  # the FastAPI-served /v1 endpoints say the same
    attempts = refused_attempts(gw, created["id"])
    assert len(attempts) >= 1 and attempts[-1]["team"] == "leaky"


def test_a_request_with_no_key_of_ours_is_logged_with_its_origin_and_fingerprint_never_the_secret(gw, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="sovereign.gateway.auth")
    wrong = "sk-sov-" + "f" * 48
    for path in ("/v1/chat/completions", "/admin/teams"):
        r = httpx.post(f"{gw.url}{path}", headers={"Authorization": f"Bearer {wrong}",
                                                   "X-Forwarded-For": "10.20.30.40"}, json={})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{gw.url}/v1/models").status_code == 401
    lines = [r for r in caplog.records if r.name == "sovereign.gateway.auth"]
    assert [(r.path, r.reason) for r in lines] == [("/v1/chat/completions", "unknown key"),
                                                   ("/admin/teams", "unknown key"), ("/v1/models", "no key")]
    assert lines[0].key_fingerprint == hash_secret(wrong)[:12] and lines[2].key_fingerprint is None
    assert lines[0].client == "127.0.0.1" and lines[0].forwarded_for == "10.20.30.40"
    assert wrong not in caplog.text and wrong[8:] not in caplog.text


def test_admin_api_refuses_non_admin_and_missing_keys(gw):
    assert httpx.get(f"{gw.url}/admin/teams").status_code == 401
    r = httpx.get(f"{gw.url}/admin/teams", headers={"Authorization": f"Bearer {gw.key()}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"


def test_admin_api_validation_and_conflicts_are_clear_4xx(gw):
    admin = httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {gw.admin_key}"})
    r = admin.post("/admin/teams", json={"name": "x", "pii": "sometimes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "pii"
    assert admin.post("/admin/teams", json={"name": "dup"}).status_code == 201
    r = admin.post("/admin/teams", json={"name": "dup"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "team_exists"
    r = admin.post("/admin/keys", json={"team": "ghost"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "team_not_found"
    admin.post("/admin/keys", json={"team": "dup"})
    r = admin.delete("/admin/teams/dup")
    assert r.status_code == 409 and r.json()["error"]["code"] == "team_has_keys"
    assert admin.delete("/admin/teams/dup", params={"force": "true"}).json()["keys_deleted"] == 1
    # Once every key is revoked, as the refusal says, the team goes without force, its dead keys with it.
    admin.post("/admin/teams", json={"name": "gone"})
    key_id = admin.post("/admin/keys", json={"team": "gone"}).json()["id"]
    assert "1 working key" in admin.delete("/admin/teams/gone").json()["error"]["message"]
    admin.post(f"/admin/keys/{key_id}/revoke")
    assert admin.delete("/admin/teams/gone").json() == {"deleted": "gone", "keys_deleted": 1}


def test_keys_are_stored_only_as_hashes(gw):
    secret = gw.key()
    db = gw.app.config.resolved_database_url().split("///", 1)[1]
    raw = open(db, "rb").read()
    assert secret.encode() not in raw
    assert any(k.prefix == secret[:12] for k in gw.accounts.list_keys())
    assert hash_secret(secret) in {e.secret_hash for e in gw.app.directory._keys.values()}


def test_cli_manages_teams_and_keys_on_the_gateways_database(gw, tmp_path):
    db = ["--database-url", gw.app.config.resolved_database_url()]
    run_sovereign(tmp_path, "teams", "create", "support", "--models", "fake-model,support@*", "--max-tokens", "32",
                  "--pii", "block", "--rpm", "600", *db)
    teams = json.loads(run_sovereign(tmp_path, "teams", "list", "--json", *db).stdout)
    support = next(t for t in teams if t["name"] == "support")
    assert support["allowed_models"] == ["fake-model", "support@*"] and support["max_tokens"] == 32
    run_sovereign(tmp_path, "teams", "update", "support", "--pii", "redact", "--clear", "max_tokens", *db)
    support = next(t for t in json.loads(run_sovereign(tmp_path, "teams", "list", "--json", *db).stdout)
                   if t["name"] == "support")
    assert support["pii"] == "redact" and support["max_tokens"] is None

    secret = run_sovereign(tmp_path, "keys", "create", "--team", "support", "--name", "bot", *db).stdout.strip()
    assert secret.startswith("sk-sov-")
    c = gw.client(secret)
    wait_for(lambda: c.models.list())
    key_id = json.loads(run_sovereign(tmp_path, "keys", "list", "--team", "support", "--json", *db).stdout)[0]["id"]
    run_sovereign(tmp_path, "keys", "revoke", key_id, *db)

    def revoked():  # an AssertionError, so wait_for retries until the directory has refreshed
        try:
            c.models.list()
        except openai.AuthenticationError:
            return
        raise AssertionError("the revoked key still works")

    wait_for(revoked)
    bad = run_sovereign(tmp_path, "teams", "create", "bad", "--pii", "maybe", *db, check=False)
    assert bad.returncode == 2 and "pii" in bad.stderr
    gone = run_sovereign(tmp_path, "keys", "revoke", "key_nope", *db, check=False)
    assert gone.returncode == 2 and "key_not_found" in gone.stderr


@pytest.mark.parametrize("store", ["sqlite_url", "pg_url"])
def test_admin_values_no_database_can_hold_are_400_not_500(request, store):
    from fastapi.testclient import TestClient

    from gateway.accounts import Accounts, KeySpec, TeamSpec
    from gateway.admin import build_admin_app
    from gateway.db import init_db, make_engine
    from gateway.directory import Directory

    engine = make_engine(request.getfixturevalue(store))
    init_db(engine)
    accounts, directory = Accounts(engine), Directory(engine)
    accounts.create_team(TeamSpec(name="admin"))
    secret = accounts.create_key(KeySpec(team="admin", is_admin=True)).secret
    directory.reload_if_changed()
    c = TestClient(build_admin_app(accounts, directory), raise_server_exceptions=False,
                   headers={"Authorization": f"Bearer {secret}"})
    for method, path, body in [
        ("POST", "/admin/teams", {"name": "t1", "requests_per_minute": 2**31}),
        ("POST", "/admin/teams", {"name": "t2", "max_tokens": 2**31}),
        ("POST", "/admin/teams", {"name": "t3", "daily_tokens": 2**63}),
        ("POST", "/admin/teams", {"name": "t4", "allowed_models": ["a\u0000b"]}),
        ("POST", "/admin/keys", {"team": "admin", "name": "x\u0000y"}),
        ("POST", "/admin/keys", {"team": "admin", "tokens_per_minute": 2**63}),
        ("PATCH", "/admin/teams/admin", {"requests_per_minute": 2**40}),
        ("GET", "/admin/teams/a%00b", None),
        ("POST", "/admin/keys/a%00b/revoke", None),
    ]:
        r = c.request(method, path, json=body)
        assert 400 <= r.status_code < 500 and r.json()["error"]["message"], (method, path, body, r.text)
    r = c.post("/admin/teams", content=b"{bad json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] is None
    assert "not valid JSON" in r.json()["error"]["message"]
    engine.dispose()


def test_cli_refuses_a_bad_limit_with_a_message(gw, tmp_path):
    url = gw.app.config.resolved_database_url()
    out = run_sovereign(tmp_path, "keys", "create", "--team", "t", "--rpm", "0", "--database-url", url, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "requests_per_minute" in out.stderr


def test_a_key_that_expires_stops_working_everywhere_and_says_when(gw):
    from datetime import UTC, datetime, timedelta, timezone

    admin = httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {gw.admin_key}"})
    assert admin.post("/admin/teams", json={"name": "pilot", "allowed_models": ["fake-model"]}).status_code == 201
    past = admin.post("/admin/keys", json={"team": "pilot", "expires_at": "2020-01-01T00:00:00Z"})
    assert past.status_code == 400 and past.json()["error"]["param"] == "expires_at"
    assert "in the past" in past.json()["error"]["message"]
    soon = datetime.now(UTC) + timedelta(seconds=2)
    local = soon.astimezone(timezone(timedelta(hours=8))).isoformat()  # the same instant: stored and shown in UTC
    created = admin.post("/admin/keys", json={"team": "pilot", "name": "trial", "expires_at": local}).json()
    assert abs(datetime.fromisoformat(created["expires_at"]) - soon) < timedelta(milliseconds=1)
    client = gw.client(created["secret"])
    assert client.chat.completions.create(model="fake-model", messages=USER).choices
    assert [k["id"] for k in admin.get("/admin/keys", params={"team": "pilot"}).json()] == [created["id"]]
    time.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.05)
    with pytest.raises(openai.AuthenticationError) as refused:  # no reload needed: expiry is a time, not a change
        client.chat.completions.create(model="fake-model", messages=USER)
    message = refused.value.body["message"]
    assert refused.value.body["code"] == "invalid_api_key" and f"({created['id']}) expired at " in message
    assert soon.strftime("%Y-%m-%dT%H:%M:%S") in message and "sovereign keys create" in message
    with pytest.raises(openai.AuthenticationError, match="expired at"):
        client.files.list()  # the FastAPI-served /v1 endpoints say the same
    # Who still calls with the expired key is in the audit trail and the metrics, under its key and team.
    attempt = refused_attempts(gw, created["id"])
    assert len(attempt) == 1 and attempt[0]["team"] == "pilot" and attempt[0]["policy"]["error"] == "invalid_api_key"
    metrics = httpx.get(f"{gw.url}/metrics").text
    assert re.search(r'requests_total\{(?=[^}]*team="pilot")(?=[^}]*status="401")[^}]*\} 1\.0', metrics)
    assert admin.get("/admin/keys", params={"team": "pilot"}).json() == []  # live keys only
    listed = admin.get("/admin/keys", params={"team": "pilot", "include_revoked": "true"}).json()
    assert [k["id"] for k in listed] == [created["id"]] and listed[0]["revoked_at"] is None
    assert admin.get("/admin/teams/pilot").json()["active_keys"] == 0


def test_cli_keys_expire_after_a_duration_or_at_a_time(gw, tmp_path):
    from datetime import UTC, datetime, timedelta

    db = ["--database-url", gw.app.config.resolved_database_url()]
    run_sovereign(tmp_path, "teams", "create", "contractors", *db)
    made = json.loads(run_sovereign(tmp_path, "keys", "create", "--team", "contractors", "--expires", "90d",
                                    "--json", *db).stdout)
    assert abs(datetime.fromisoformat(made["expires_at"]) - (datetime.now(UTC) + timedelta(days=90))) < \
        timedelta(minutes=1)
    at = json.loads(run_sovereign(tmp_path, "keys", "create", "--team", "contractors", "--expires",
                                  "2099-03-31T18:00:00Z", "--json", *db).stdout)
    assert at["expires_at"] == "2099-03-31T18:00:00Z"
    listing = run_sovereign(tmp_path, "keys", "list", "--team", "contractors", *db).stdout
    assert "2099-03-31 18:00" in listing
    bad = run_sovereign(tmp_path, "keys", "create", "--team", "contractors", "--expires", "soon", *db, check=False)
    assert bad.returncode == 2 and "--expires 'soon'" in bad.stderr and "90d" in bad.stderr


@pytest.mark.parametrize("store", ["sqlite_url", "pg_url"])
def test_a_database_from_before_key_expiry_gets_the_column_and_its_keys_keep_working(request, store):
    """init_db adds a column a later release brought to a table an earlier one created; old rows mean "not set"."""
    from sqlalchemy import inspect, text

    from gateway.accounts import Accounts, KeySpec, TeamSpec
    from gateway.db import init_db, make_engine
    from gateway.directory import Directory

    url = request.getfixturevalue(store)
    engine = make_engine(url)
    init_db(engine)
    Accounts(engine).create_team(TeamSpec(name="t"))
    secret = Accounts(engine).create_key(KeySpec(team="t")).secret
    with engine.begin() as conn:  # the table as the release before expiry made it
        conn.execute(text("ALTER TABLE gateway_keys DROP COLUMN expires_at"))
    engine.dispose()
    engine = make_engine(url)
    assert "expires_at" not in {c["name"] for c in inspect(engine).get_columns("gateway_keys")}
    init_db(engine)
    directory = Directory(engine)
    directory.reload_if_changed()
    assert directory.lookup(secret) is not None
    assert Accounts(engine).list_keys()[0].expires_at is None
    engine.dispose()


def test_admin_usage_reports_what_each_team_used_from_the_audit_trail(gw):
    admin = httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {gw.admin_key}"})
    client = gw.client(gw.key("billing", allowed_models=["fake-model"]))
    for _ in range(3):
        client.chat.completions.create(model="fake-model", messages=USER)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="another-model", messages=USER)
    rows = admin.get("/admin/usage", params={"by": "team,status"}).json()
    billing = {r["group"]["status"]: r for r in rows if r["group"]["team"] == "billing"}
    assert billing[200]["requests"] == 3 and billing[200]["errors"] == 0 and billing[200]["total_tokens"] > 0
    assert billing[200]["total_tokens"] == billing[200]["prompt_tokens"] + billing[200]["completion_tokens"]
    assert set(billing) - {200} and all(r["errors"] == r["requests"] for s, r in billing.items() if s != 200)
    bad = admin.get("/admin/usage", params={"by": "teams"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "by"
    assert bad.json()["error"]["code"] == "invalid_group"
    late = admin.get("/admin/usage", params={"since": "soon"})
    assert late.status_code == 400 and late.json()["error"]["param"] == "since"
    assert httpx.get(f"{gw.url}/admin/usage", headers={"Authorization": f"Bearer {gw.key()}"}).status_code == 403


def test_rotating_a_key_keeps_the_old_secret_working_for_the_grace_period_only(gw):
    from datetime import UTC, datetime, timedelta

    admin = httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {gw.admin_key}"})
    admin.post("/admin/teams", json={"name": "crm", "allowed_models": ["fake-model"]})
    old = admin.post("/admin/keys", json={"team": "crm", "name": "crm-bot", "requests_per_minute": 50,
                                          "expires_at": (datetime.now(UTC) + timedelta(days=30)).isoformat()}).json()
    r = admin.post(f"/admin/keys/{old['id']}/rotate", json={"grace_seconds": 2})
    assert r.status_code == 201
    new = r.json()
    assert new["id"] != old["id"] and new["secret"] != old["secret"]
    assert (new["team"], new["name"], new["limits"]) == ("crm", "crm-bot", old["limits"])
    # The new key lives as long as the old one was meant to, counted from now.
    lifetime = datetime.fromisoformat(new["expires_at"]) - datetime.fromisoformat(new["created_at"])
    assert abs(lifetime - timedelta(days=30)) < timedelta(seconds=5)
    for secret in (old["secret"], new["secret"]):  # both work during the grace period
        assert gw.client(secret).chat.completions.create(model="fake-model", messages=USER).choices
    time.sleep(2.1)
    with pytest.raises(openai.AuthenticationError, match="expired at"):
        gw.client(old["secret"]).chat.completions.create(model="fake-model", messages=USER)
    assert gw.client(new["secret"]).chat.completions.create(model="fake-model", messages=USER).choices
    again = admin.post(f"/admin/keys/{old['id']}/rotate")
    assert again.status_code == 409 and again.json()["error"]["code"] == "key_not_live"
    assert "expired" in again.json()["error"]["message"]
    assert admin.post("/admin/keys/key_nope/rotate").status_code == 404
    bad = admin.post(f"/admin/keys/{new['id']}/rotate", json={"grace_seconds": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "grace_seconds"


def test_cli_rotates_a_key_and_refuses_a_bad_grace(gw, tmp_path):
    db = ["--database-url", gw.app.config.resolved_database_url()]
    run_sovereign(tmp_path, "teams", "create", "ops", *db)
    old = json.loads(run_sovereign(tmp_path, "keys", "create", "--team", "ops", "--name", "job", "--json",
                                   *db).stdout)
    new = json.loads(run_sovereign(tmp_path, "keys", "rotate", old["id"], "--grace", "7d", "--json", *db).stdout)
    assert new["name"] == "job" and new["expires_at"] is None  # the old key never expired: neither does the new
    listed = {k["id"]: k for k in json.loads(run_sovereign(tmp_path, "keys", "list", "--team", "ops", "--json",
                                                           *db).stdout)}
    assert set(listed) == {old["id"], new["id"]} and listed[old["id"]]["expires_at"]
    bad = run_sovereign(tmp_path, "keys", "rotate", new["id"], "--grace", "a while", *db, check=False)
    assert bad.returncode == 2 and "--grace 'a while'" in bad.stderr
