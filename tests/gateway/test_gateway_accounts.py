"""Keys and teams: the admin API and the `sovereign keys|teams` CLI, checked through a running gateway."""

from __future__ import annotations

import json
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
