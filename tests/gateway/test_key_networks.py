"""Keys bound to networks: refused from elsewhere (403, audited under the key), honoured behind trusted proxies only."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from gateway.accounts import KeySpec, KeyUpdate
from gateway.origin import Origins
from tests.conftest import run_sovereign
from tests.gateway.gw_stores import request_records

USER = [{"role": "user", "content": "hello"}]


def bound_key(gw, networks: list[str], team: str = "crm") -> tuple[str, str]:
    if team not in {t.name for t in gw.accounts.list_teams()}:
        gw.key(team)  # creates the team
    created = gw.accounts.create_key(KeySpec(team=team, allowed_networks=networks))
    gw.app.directory.reload_if_changed()
    return created.id, created.secret


def test_a_key_works_only_from_its_networks_and_attempts_from_elsewhere_are_audited(gw):
    here_id, here = bound_key(gw, ["127.0.0.0/8", "::1"])
    away_id, away = bound_key(gw, ["10.20.0.0/16"])
    assert gw.client(here).chat.completions.create(model="fake-model", messages=USER).choices
    with pytest.raises(openai.PermissionDeniedError) as err:
        gw.client(away).chat.completions.create(model="fake-model", messages=USER)
    assert err.value.status_code == 403 and err.value.body["code"] == "network_not_allowed"
    assert away_id in err.value.body["message"] and "127.0.0.1" in err.value.body["message"]
    assert "10.20" not in err.value.body["message"]  # the allowed networks are not told to whoever holds the secret
    # The other routes of the door refuse it the same way: models, files (FastAPI), the admin API.
    with pytest.raises(openai.PermissionDeniedError):
        gw.client(away).models.list()
    with pytest.raises(openai.PermissionDeniedError):
        gw.client(away).files.list()
    refused = [r for r in request_records(gw.app.config.resolved_database_url()) if r["key_id"] == away_id]
    assert [r["status"] for r in refused] == [403]  # the chat call: refusals of /v1/models are not audited
    assert refused[0]["policy"]["network"] == {"action": "refused", "client": "127.0.0.1"}
    metrics = httpx.get(f"{gw.url}/metrics").text
    # Counted on the proxy's routes (the chat call and the model listing).
    assert 'sovereign_gateway_policy_events_total{kind="network_refused",team="crm"} 2.0' in metrics


def test_a_spoofed_forwarded_header_counts_only_from_a_trusted_proxy(start_gateway, upstream):
    plain = start_gateway({"fake-model": [upstream.url]})
    _, secret = bound_key(plain, ["10.20.0.0/16"])
    spoofed = {"X-Forwarded-For": "10.20.1.2"}
    with pytest.raises(openai.PermissionDeniedError):  # not behind a trusted proxy: the header is the client's word
        plain.client(secret, default_headers=spoofed).chat.completions.create(model="fake-model", messages=USER)

    proxied = start_gateway({"fake-model": [upstream.url]}, trusted_proxies=["127.0.0.1", "10.99.0.0/24"])
    _, secret = bound_key(proxied, ["10.20.0.0/16"])
    via = lambda xff: proxied.client(secret, default_headers={"X-Forwarded-For": xff})  # noqa: E731
    assert via("10.20.1.2").chat.completions.create(model="fake-model", messages=USER).choices
    assert via("10.20.1.2, 10.99.0.5").chat.completions.create(model="fake-model", messages=USER).choices
    for xff in ("10.20.1.2, 192.0.2.9", "192.0.2.9", "garbage, 10.20.1.2, not-an-ip"):
        with pytest.raises(openai.PermissionDeniedError):  # the right-most untrusted hop is the client
            via(xff).chat.completions.create(model="fake-model", messages=USER)


def test_origins_pick_the_right_most_untrusted_hop():
    o = Origins(["10.0.0.0/8"])

    def client(peer: str, *xff: str):
        headers = [(b"x-forwarded-for", v.encode()) for v in xff]
        return str(o.client({"client": (peer, 1234), "headers": headers}))

    assert client("192.0.2.1", "10.1.1.1") == "192.0.2.1"  # the peer is no proxy of ours
    assert client("10.0.0.1", "198.51.100.7, 10.2.2.2") == "198.51.100.7"
    assert client("10.0.0.1", "198.51.100.7", "203.0.113.5") == "203.0.113.5"  # two headers: one list, in order
    assert client("10.0.0.1") == "10.0.0.1"  # a proxy that forwarded nothing
    assert client("::ffff:192.0.2.1") == "192.0.2.1"  # a dual-stack socket's IPv4 caller
    assert client("::ffff:10.0.0.1", "2001:db8::7") == "2001:db8::7"
    assert Origins().client({"client": None, "headers": []}) is None
    with pytest.raises(ValueError, match="trusted_proxies: 'ten' is not an IP address"):
        Origins(["ten"])


def test_networks_are_validated_changed_without_a_new_secret_and_the_change_audited(gw, tmp_path):
    admin = httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {gw.admin_key}"})
    admin.post("/admin/teams", json={"name": "ops", "allowed_models": ["fake-model"]})
    bad = admin.post("/admin/keys", json={"team": "ops", "allowed_networks": ["10.0.0.0/33"]})
    assert bad.status_code == 400 and "allowed_networks" in bad.json()["error"]["message"]
    empty = admin.post("/admin/keys", json={"team": "ops", "allowed_networks": []})
    assert empty.status_code == 400 and "usable from somewhere" in empty.json()["error"]["message"]
    key = admin.post("/admin/keys", json={"team": "ops", "allowed_networks": ["10.20.3.4/16"]}).json()
    assert key["allowed_networks"] == ["10.20.0.0/16"]  # normalized
    with pytest.raises(openai.PermissionDeniedError):
        gw.client(key["secret"]).chat.completions.create(model="fake-model", messages=USER)
    moved = admin.patch(f"/admin/keys/{key['id']}", json={"allowed_networks": ["127.0.0.1"]})
    assert moved.status_code == 200 and moved.json()["allowed_networks"] == ["127.0.0.1/32"]
    assert gw.client(key["secret"]).chat.completions.create(model="fake-model", messages=USER).choices
    assert admin.patch(f"/admin/keys/{key['id']}", json={"allowed_networks": ["127.0.0.1/32"]}).status_code == 200
    changes = admin.get("/admin/changes", params={"team": "ops"}).json()
    assert [c["action"] for c in changes].count("key.update") == 1  # the same networks again changed nothing
    assert changes[-1]["action"] == "key.update"
    assert changes[-1]["details"]["changes"] == {"allowed_networks": [["10.20.0.0/16"], ["127.0.0.1/32"]]}
    # The CLI: create bound, list shows it, lift the binding.
    db = ["--database-url", gw.app.config.resolved_database_url()]
    run_sovereign(tmp_path, "keys", "create", "--team", "ops", "--allow-from", "192.0.2.0/24, 2001:db8::/32", *db)
    listed = json.loads(run_sovereign(tmp_path, "keys", "list", "--team", "ops", "--json", *db).stdout)
    cli_key = next(k for k in listed if k["allowed_networks"] == ["192.0.2.0/24", "2001:db8::/32"])
    assert "192.0.2.0/24, 2001:db8::/32" in run_sovereign(tmp_path, "keys", "list", "--team", "ops", *db).stdout
    out = run_sovereign(tmp_path, "keys", "update", cli_key["id"], "--allow-from-anywhere", *db)
    assert "anywhere" in out.stdout + out.stderr
    neither = run_sovereign(tmp_path, "keys", "update", cli_key["id"], *db, check=False)
    assert neither.returncode == 2 and "--allow-from" in neither.stdout + neither.stderr
    bad_cli = run_sovereign(tmp_path, "keys", "create", "--team", "ops", "--allow-from", "10.0.0.300", *db,
                            check=False)
    assert bad_cli.returncode == 2 and "not an IP address" in bad_cli.stdout + bad_cli.stderr
    assert gw.accounts.update_key(cli_key["id"], KeyUpdate(allowed_networks=["10.0.0.0/8"])).allowed_networks == [
        "10.0.0.0/8"]
