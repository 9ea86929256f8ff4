"""The organisation's own PII kinds ($SOVEREIGN_HOME/pii-rules.yaml) in a real `sovereign gateway` process, in front
of the fake upstream: pii=redact hides them from the replica, the audit store and the log; pii=block refuses them;
a rules file that would misbehave stops the gateway at start, naming the rule; a changed file reaches the running
gateway, and a bad change is refused while the kinds before stay in force."""

from __future__ import annotations

import subprocess

import httpx
import openai
import pytest

from sovereign.offline import offline_env
from tests.gateway.conftest import start_gateway_process, wait_for, write_gateway_config
from tests.gateway.gw_stores import request_records

RULES = "kinds:\n  customer_id:\n    pattern: 'CUST-[0-9]{8}'\n    examples: ['CUST-00412345']\n"
PROMPT = "Customer CUST-00412345 (mobile 13812345678) asks about a refund"


def test_pii_redact_and_block_cover_the_organisations_own_kinds(tmp_path, upstream):
    (tmp_path / "pii-rules.yaml").write_text(RULES)
    db = tmp_path / "gateway.db"
    config = write_gateway_config(tmp_path / "gateway.yaml", models={"fake-model": [upstream.url]},
                                  database_url=f"sqlite:///{db}")
    gw = start_gateway_process(config, tmp_path, name="pii-rules-gateway")
    try:
        redacting = gw.client(gw.make_key("careful", pii="redact", audit_content="redacted"))
        answer = redacting.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": PROMPT}])
        sent = upstream.requests[-1]["messages"][0]["content"]
        assert sent == "Customer [CUSTOMER_ID] (mobile [PHONE]) asks about a refund"
        assert "CUST-00412345" not in answer.choices[0].message.content
        hits = upstream.hits
        with pytest.raises(openai.BadRequestError) as err:
            gw.client(gw.make_key("strict", pii="block")).chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": "I am CUST-00412345"}])
        assert err.value.body["code"] == "content_policy_violation" and "customer_id" in err.value.body["message"]
        assert upstream.hits == hits
    finally:
        gw.stop()
    rows = request_records(f"sqlite:///{db}")
    assert rows[0]["policy"]["pii"] == {"action": "redacted", "counts": {"customer_id": 1, "phone": 1}}
    assert "[CUSTOMER_ID]" in rows[0]["prompt"]
    assert rows[1]["status"] == 400 and rows[1]["policy"]["pii"] == {"action": "blocked", "kinds": ["customer_id"]}
    for stored in (db, gw.log_path):
        assert b"CUST-00412345" not in stored.read_bytes()
    assert '"kinds": ["customer_id"]' in gw.log_path.read_text()  # the start names the rules it loaded


def test_a_rules_file_that_would_misbehave_stops_the_gateway_at_start(tmp_path, upstream):
    from tests.conftest import REPO, sovereign_cmd

    rules = tmp_path / "rules.yaml"
    rules.write_text("kinds:\n  case_id:\n    pattern: '[0-9]*'\n")
    config = write_gateway_config(tmp_path / "gateway.yaml", models={"fake-model": [upstream.url]},
                                  database_url=f"sqlite:///{tmp_path / 'gateway.db'}")
    env = offline_env(SOVEREIGN_HOME=str(tmp_path), PYTHONPATH=str(REPO), SOVEREIGN_PII_RULES=str(rules))
    proc = subprocess.run(sovereign_cmd("gateway", "--config", str(config), "--port", "1"), env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{rules}: kinds.case_id.pattern matches the empty string" in " ".join((proc.stdout + proc.stderr).split())


def test_a_changed_rules_file_reaches_the_running_gateway_and_a_bad_one_changes_nothing(tmp_path, upstream):
    rules = tmp_path / "pii-rules.yaml"
    rules.write_text(RULES)
    config = write_gateway_config(tmp_path / "gateway.yaml", models={"fake-model": [upstream.url]},
                                  database_url=f"sqlite:///{tmp_path / 'gateway.db'}", pii_rules_refresh_s=0.2)
    gw = start_gateway_process(config, tmp_path, name="pii-reload-gateway")
    try:
        client = gw.client(gw.make_key("careful", pii="redact"))

        def sent(content: str) -> str:
            client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": content}])
            return upstream.requests[-1]["messages"][0]["content"]

        def pii_status() -> dict:
            return httpx.get(f"{gw.url}/readyz").json()["pii_rules"]

        assert sent("CUST-00412345 about POL-123456") == "[CUSTOMER_ID] about POL-123456"
        rules.write_text(RULES + "  policy_number:\n    pattern: 'POL-[0-9]{6}'\n    examples: ['POL-123456']\n")
        wait_for("the new kind", lambda: pii_status()["kinds"] == ["customer_id", "policy_number"])
        assert sent("CUST-00412345 about POL-123456") == "[CUSTOMER_ID] about [POLICY_NUMBER]"

        rules.write_text("kinds:\n  case_id:\n    pattern: '[0-9]*'\n")  # would drop both kinds: refused
        wait_for("the refusal", lambda: pii_status()["refused"] is not None)
        assert "kinds.case_id.pattern matches the empty string" in pii_status()["refused"]["error"]
        assert sent("CUST-00412345 about POL-123456") == "[CUSTOMER_ID] about [POLICY_NUMBER]"
        assert "sovereign_gateway_pii_rules_refused 1.0" in httpx.get(f"{gw.url}/metrics").text
    finally:
        gw.stop()
    log_text = gw.log_path.read_text()
    assert "PII rules reloaded" in log_text and "PII rules change refused" in log_text
    assert "CUST-00412345" not in log_text and "POL-123456" not in log_text
