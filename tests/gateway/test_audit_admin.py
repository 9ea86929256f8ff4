"""Changes to teams and keys are in the audit trail: who made them, what changed, never a secret."""

from __future__ import annotations

import io
import json

import httpx
import pytest
from sqlalchemy import create_engine

from gateway.accounts import AccountError, Accounts, TeamSpec, TeamUpdate, hash_secret
from gateway.audit_admin import AdminTrail
from gateway.audit_read import export, verify
from gateway.audit_usage import usage
from gateway.db import init_db
from tests.conftest import run_sovereign


def trail(db_url: str) -> tuple[list[dict], str]:
    """The admin records of the trail at `db_url`, and the whole export's text."""
    out = io.StringIO()
    export(db_url, out)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    return [r for r in rows if "admin" in r["policy"]], out.getvalue()


def test_admin_api_changes_are_audited_under_the_admin_key_with_what_changed(gw):
    db = gw.app.config.resolved_database_url()
    admin_id = "key_bootstrap_" + hash_secret(gw.admin_key)[:8]
    admin = httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {gw.admin_key}"})
    assert admin.post("/admin/teams", json={"name": "risk", "allowed_models": ["fake-model"], "pii": "redact",
                                            "max_tokens": 64}).status_code == 201
    assert admin.patch("/admin/teams/risk", json={"pii": "off", "max_tokens": None,
                                                  "allowed_models": ["fake-model"]}).status_code == 200
    created = admin.post("/admin/keys", json={"team": "risk", "name": "scoring", "daily_tokens": 1000}).json()
    rotated = admin.post(f"/admin/keys/{created['id']}/rotate", json={"grace_seconds": 60}).json()
    assert admin.post(f"/admin/keys/{rotated['id']}/revoke").status_code == 200
    assert admin.post(f"/admin/keys/{rotated['id']}/revoke").status_code == 200  # already revoked: no change
    assert admin.delete("/admin/teams/risk", params={"force": "true"}).status_code == 200

    records, text = trail(db)
    # The gateway's own start made its bootstrap admin team and key; then the six changes above, in order.
    assert [(r["policy"]["admin"]["action"], r["team"]) for r in records] == [
        ("team.create", "admin"), ("key.create", "admin"), ("team.create", "risk"), ("team.update", "risk"),
        ("key.create", "risk"), ("key.rotate", "risk"), ("key.revoke", "risk"), ("team.delete", "risk")]
    start, changes = records[:2], records[2:]
    assert {r["policy"]["admin"]["by"] for r in start} == {"gateway-start"} and {r["key_id"] for r in start} == {None}
    assert all(r["key_id"] == admin_id and r["policy"]["admin"]["by"] == admin_id for r in changes)
    assert all(r["status"] == 0 and r["model"] is None and r["prompt"] is None for r in records)
    create, update, key, rotate, revoke, delete = (r["policy"]["admin"] for r in changes)
    assert create["policy"]["pii"] == "redact" and create["policy"]["max_tokens"] == 64
    assert update["changes"] == {"pii": ["redact", "off"], "max_tokens": [64, None]}  # allowed_models did not change
    assert key["key"] == created["id"] and key["name"] == "scoring" and key["limits"] == {"daily_tokens": 1000}
    assert rotate["key"] == created["id"] and rotate["new_key"] == rotated["id"] and rotate["key_expires_at"]
    assert revoke == {"action": "key.revoke", "by": admin_id, "key": rotated["id"], "name": "scoring"}
    assert delete["force"] is True and set(delete["keys_deleted"]) == {created["id"], rotated["id"]}
    for secret in (created["secret"], rotated["secret"], gw.admin_key):
        assert secret not in text and secret[:12] not in text
    assert verify(db).ok
    assert usage(db, ["team"]) == []  # changes are no requests: chargeback leaves them out
    # What an auditor reads: the same changes, through the admin API.
    listed = admin.get("/admin/changes", params={"team": "risk"}).json()
    assert [c["action"] for c in listed] == ["team.create", "team.update", "key.create", "key.rotate", "key.revoke",
                                             "team.delete"]
    assert listed[1]["by"] == admin_id and listed[1]["details"]["changes"]["pii"] == ["redact", "off"]
    assert admin.get("/admin/changes", params={"since": "2999-01-01"}).json() == []
    bad = admin.get("/admin/changes", params={"since": "last week"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"


def test_cli_changes_are_audited_with_the_user_and_host_who_made_them(gw, tmp_path):
    db_url = gw.app.config.resolved_database_url()
    db = ["--database-url", db_url]
    run_sovereign(tmp_path, "teams", "create", "ops", "--models", "fake-model", "--pii", "block", *db)
    run_sovereign(tmp_path, "teams", "update", "ops", "--pii", "redact", *db)
    run_sovereign(tmp_path, "keys", "create", "--team", "ops", "--name", "batch", *db)
    key_id = json.loads(run_sovereign(tmp_path, "keys", "list", "--team", "ops", "--json", *db).stdout)[0]["id"]
    run_sovereign(tmp_path, "keys", "revoke", key_id, *db)
    records = [r for r in trail(db_url)[0] if r["team"] == "ops"]
    assert [r["policy"]["admin"]["action"] for r in records] == ["team.create", "team.update", "key.create",
                                                                 "key.revoke"]
    assert records[1]["policy"]["admin"]["changes"] == {"pii": ["block", "redact"]}
    assert all(r["key_id"] is None and r["policy"]["admin"]["by"].startswith("cli:") for r in records)
    assert verify(db_url).ok
    table = run_sovereign(tmp_path, "audit", "changes", "--team", "ops", *db).stdout
    assert "team.update" in table and '"pii": ["block", "redact"]' in table and "cli:" in table
    # A prune is one of the trail's own records too, and `audit changes` lists it; the changes it took are gone.
    cut = records[-1]["ts"] + 0.001  # just after the revocation, whenever this machine got here
    run_sovereign(tmp_path, "audit", "prune", "--before", str(cut), "--no-archive", "--yes", *db)
    listed = json.loads(run_sovereign(tmp_path, "audit", "changes", "--json", *db).stdout)
    assert [c["action"] for c in listed] == ["audit.prune"] and listed[0]["by"].startswith("cli:")
    assert listed[0]["details"]["archive"] is None and listed[0]["details"]["through"] == records[-1]["id"]


def test_a_change_whose_record_cannot_be_written_says_so(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'gateway.db'}")
    init_db(engine)
    nowhere = tmp_path / "file"
    nowhere.write_text("")  # a file where the audit database's folder should be
    accounts = Accounts(engine, AdminTrail(f"sqlite:///{nowhere / 'audit.db'}"))
    with pytest.raises(AccountError) as err:
        accounts.create_team(TeamSpec(name="t"))
    assert err.value.status == 500 and err.value.code == "audit_unavailable"
    assert "the change was made" in err.value.message
    # The change stands (it committed first); the next one is refused the same way until the trail is back.
    assert Accounts(engine).get_team("t").name == "t"
    with pytest.raises(AccountError):
        accounts.update_team("t", TeamUpdate(pii="redact"))
