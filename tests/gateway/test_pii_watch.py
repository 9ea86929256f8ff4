"""A changed PII rules file reaches the running gateway (gateway.pii_watch): applied once two reads agree, refused
with the kinds before kept in force when it would misbehave, and the default file's removal drops the own kinds."""

from __future__ import annotations

import pytest

from gateway.metrics import GatewayMetrics
from gateway.pii_watch import PiiRulesWatch
from sovereign import pii, pii_rules

CUSTOMER = "kinds:\n  customer_id:\n    pattern: 'CUST-[0-9]{8}'\n    examples: ['CUST-00412345']\n"
POLICY = "  policy_number:\n    pattern: 'POL-[0-9]{6}'\n    examples: ['POL-123456']\n"
TEXT = "CUST-00412345 asks about POL-123456"


@pytest.fixture()
def rules_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SOVEREIGN_HOME", str(tmp_path))
    monkeypatch.delenv(pii_rules.ENV_VAR, raising=False)
    pii_rules.uninstall()
    yield tmp_path / pii_rules.FILE_NAME
    pii_rules.uninstall()


def found() -> list[str]:
    return [m.kind for m in pii.find_pii(TEXT)]


def gauge(metrics: GatewayMetrics, name: str, labels: dict | None = None) -> float:
    return metrics.registry.get_sample_value(f"sovereign_gateway_{name}", labels or {})


def test_a_new_file_applies_after_two_equal_reads_and_a_half_written_one_never(rules_file):
    rules_file.write_text(CUSTOMER)
    pii_rules.install()
    watch = PiiRulesWatch(1.0, GatewayMetrics())
    assert watch.check() is None and found() == ["customer_id"]  # unchanged

    rules_file.write_text(CUSTOMER + "  policy_number:\n")  # caught half-written: would be refused
    assert watch.check() is None
    rules_file.write_text(CUSTOMER + POLICY)  # finished before the next read: that read differs again
    assert watch.check() is None and found() == ["customer_id"]
    assert watch.check() == "applied"
    assert found() == ["customer_id", "policy_number"]
    assert watch.status()["kinds"] == ["customer_id", "policy_number"] and watch.status()["refused"] is None
    assert gauge(watch.metrics, "pii_rules_kinds") == 2
    assert gauge(watch.metrics, "pii_rules_reloads_total", {"result": "applied"}) == 1
    assert gauge(watch.metrics, "pii_rules_reloads_total", {"result": "refused"}) is None
    assert watch.check() is None


def test_a_file_that_would_misbehave_is_refused_and_the_kinds_before_stay(rules_file, caplog):
    rules_file.write_text(CUSTOMER)
    pii_rules.install()
    watch = PiiRulesWatch(1.0, GatewayMetrics())
    rules_file.write_text(CUSTOMER + "  case_id:\n    pattern: '[0-9]*'\n")
    assert watch.check() is None
    assert watch.check() == "refused"
    assert found() == ["customer_id"]
    refused = watch.status()["refused"]
    assert "kinds.case_id.pattern matches the empty string" in refused["error"]
    assert gauge(watch.metrics, "pii_rules_refused") == 1
    assert "PII rules change refused" in caplog.text
    assert watch.check() is None  # refused once, not every round

    rules_file.write_text(CUSTOMER)  # put back: the refusal is over
    assert watch.check() is None
    assert watch.status()["refused"] is None and gauge(watch.metrics, "pii_rules_refused") == 0
    assert gauge(watch.metrics, "pii_rules_reloads_total", {"result": "refused"}) == 1


def test_an_example_the_rule_does_not_find_is_refused_without_a_moment_of_the_new_kinds(rules_file):
    rules_file.write_text(CUSTOMER)
    pii_rules.install()
    watch = PiiRulesWatch(1.0, GatewayMetrics())
    rules_file.write_text(CUSTOMER + "  policy_number:\n    pattern: 'POL-[0-9]{6}'\n    examples: ['POL-12345']\n")
    watch.check()
    assert watch.check() == "refused"
    assert "'POL-12345' is not found whole" in watch.status()["refused"]["error"]
    assert found() == ["customer_id"] and pii_rules.installed().kinds == ["customer_id"]


def test_removing_the_default_file_leaves_the_built_in_kinds(rules_file):
    rules_file.write_text(CUSTOMER)
    pii_rules.install()
    watch = PiiRulesWatch(1.0, GatewayMetrics())
    rules_file.unlink()
    assert watch.check() is None
    assert watch.check() == "applied"
    assert found() == [] and watch.status()["file"] is None
    assert gauge(watch.metrics, "pii_rules_kinds") == 0


def test_a_named_file_that_disappears_is_refused(rules_file, monkeypatch):
    named = rules_file.parent / "named.yaml"
    named.write_text(CUSTOMER)
    monkeypatch.setenv(pii_rules.ENV_VAR, str(named))
    pii_rules.install()
    watch = PiiRulesWatch(1.0, GatewayMetrics())
    named.unlink()
    watch.check()
    assert watch.check() == "refused"
    assert "no such file" in watch.status()["refused"]["error"] and found() == ["customer_id"]
    named.write_text(CUSTOMER)
    assert watch.check() is None and watch.status()["refused"] is None
