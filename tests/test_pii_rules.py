"""An organisation's own kinds of personal data (sovereign.pii_rules): loaded once, found by every sovereign.pii
function, and refused at load when a rule would misbehave."""

from __future__ import annotations

import json
import re

import pytest

from sovereign import pii, pii_rules
from sovereign.errors import ConfigError
from sovereign.pii_rules import ENV_VAR, install, rules_path
from tests.conftest import run_sovereign

RULES = """
kinds:
  customer_id:
    pattern: 'CUST-[0-9]{8}'
    examples: ['CUST-00412345']
  policy_number:
    pattern: 'P[0-9]{10}'
    placeholder: '[POLICY]'
    ignore_case: true
  account:
    pattern: '6222[0-9]{12}'
"""


@pytest.fixture(autouse=True)
def built_in_only_after():
    yield
    pii_rules.uninstall()


@pytest.fixture()
def rules(tmp_path):
    path = tmp_path / "pii-rules.yaml"
    path.write_text(RULES)
    return path


def test_custom_kinds_are_found_redacted_and_counted_beside_the_built_in_ones(rules):
    loaded = install(rules)
    assert loaded.kinds == ["customer_id", "policy_number", "account"] and len(loaded.sha256) == 64
    text = "客户号CUST-00412345，保单 p1234567890，电话 13812345678"
    clean, counts = pii.redact(text)
    assert clean == "客户号[CUSTOMER_ID]，保单 [POLICY]，电话 [PHONE]"
    assert counts["customer_id"] == 1 and counts["policy_number"] == 1 and counts["phone"] == 1
    assert counts["account"] == 0 and set(counts) == set(pii.kinds())
    assert pii.redact(clean) == (clean, dict.fromkeys(pii.kinds(), 0))  # idempotent
    assert pii.contains_pii("ref CUST-00412345") and [m.placeholder for m in pii.find_pii("CUST-00412345")] == [
        "[CUSTOMER_ID]"]
    assert pii.kinds()[:3] == ("customer_id", "policy_number", "account")
    assert pii.placeholders()["policy_number"] == "[POLICY]"


def test_whole_word_keeps_longer_codes_and_the_org_kind_outranks_a_card_of_equal_length(rules):
    install(rules)
    assert pii.find_pii("XCUST-00412345 CUST-004123456 CUST-00412345-7") == []
    card = "6222" + "02123456789"
    card += pii.luhn_check_digit(card)  # 16 digits that a built-in kind finds too
    assert pii.bank_card_valid(card)
    assert [m.kind for m in pii.find_pii(f"account {card}")] == ["account"]
    pii_rules.uninstall()
    assert [m.kind for m in pii.find_pii(f"account {card}")] == ["bank_card"]


def test_without_a_file_only_the_built_in_kinds_are_found(tmp_path, monkeypatch, rules):
    install(rules)
    monkeypatch.setenv("SOVEREIGN_HOME", str(tmp_path / "empty-home"))
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert rules_path() is None and install().kinds == []
    assert pii.kinds() == pii.KINDS and pii.find_pii("CUST-00412345") == []


def test_the_file_in_sovereign_home_is_the_default_and_the_variable_outranks_it(tmp_path, monkeypatch, rules):
    home = tmp_path / "home"
    home.mkdir()
    (home / "pii-rules.yaml").write_text("kinds: {case_id: {pattern: 'CASE-[0-9]{6}'}}\n")
    monkeypatch.setenv("SOVEREIGN_HOME", str(home))
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert install().kinds == ["case_id"]
    monkeypatch.setenv(ENV_VAR, str(rules))
    assert install().kinds == ["customer_id", "policy_number", "account"]
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="SOVEREIGN_PII_RULES=.*missing.yaml: no such file"):
        install()


@pytest.mark.parametrize("text,message", [
    ("kinds: {x: {pattern: '(ab'}}", "kinds.x.pattern does not compile: missing \\)"),
    ("kinds: {x: {pattern: '[0-9]*'}}", "kinds.x.pattern matches the empty string"),
    ("kinds: {x: {pattern: '[A-Z]+'}}", "kinds.x.pattern finds the placeholder \\[PHONE\\]"),
    ("kinds: {x: {pattern: 'A[0-9]{4}', examples: ['A12345']}}",
     "kinds.x.examples: 'A12345' is not found whole as x \\(found nothing\\)"),
    ("kinds: {x: {pattern: 'A[0-9]{4}', examples: ['A1234 13812345678']}}", "found x 'A1234', phone"),
    ("kinds: {phone: {pattern: 'A[0-9]{4}'}}", "'phone' is a built-in kind"),
    ("kinds: {Bad-Name: {pattern: 'A[0-9]{4}'}}", "kinds.Bad-Name: a kind's name is lower-case"),
    ("kinds: {x: {pattern: 'A[0-9]{4}', placeholder: '[EMAIL]'}}", "placeholder \\[EMAIL\\] is already email's"),
    ("kinds: {x: {pattern: 'A[0-9]{4}', placeholder: 'X1'}}", "kinds.x.placeholder: Value error, must be capital"),
    ("kinds: {x: {patern: 'A[0-9]{4}'}}", "kinds.x.pattern: Field required; kinds.x.patern: Extra inputs"),
    ("kinds: [", "not valid YAML"),
])
def test_a_rule_that_would_misbehave_is_refused_naming_it_and_the_kinds_before_stay(tmp_path, rules, text, message):
    install(rules)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=f"{bad}: .*{message}"):
        install(bad)
    assert pii.kinds()[0] == "customer_id"  # a failed load changes nothing


def test_the_cli_lists_the_kinds_and_shows_what_a_text_becomes(tmp_path, rules):
    kinds = json.loads(run_sovereign(tmp_path, "pii", "kinds", "--rules", str(rules), "--json").stdout)
    assert {"kind": "customer_id", "placeholder": "[CUSTOMER_ID]", "from": str(rules)} in kinds
    assert {"kind": "phone", "placeholder": "[PHONE]", "from": "built-in"} in kinds
    out = json.loads(run_sovereign(tmp_path, "pii", "check", "--rules", str(rules), "--json",
                                   "Kunde CUST-00412345 ruft 13812345678 an").stdout)
    assert out["redacted"] == "Kunde [CUSTOMER_ID] ruft [PHONE] an"
    assert [m["kind"] for m in out["matches"]] == ["customer_id", "phone"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("kinds: {x: {pattern: '[0-9]*'}}")
    proc = run_sovereign(tmp_path, "pii", "check", "--rules", str(bad), "x", check=False)
    assert proc.returncode == 2 and "matches the empty string" in proc.stderr


@pytest.mark.parametrize("pattern,probe", [
    (r"(\w+\s?)+$", "'a' repeated"),
    (r"(a|aa)+c", "'a' repeated"),
    (r"([A-Z]+-?)+[0-9]{4}", "'A' repeated"),
    (r"CASE-(ab|a|b)+X", "its example 'CASE-abX' with 'ab' repeated"),
])
def test_a_pattern_that_backtracks_catastrophically_is_refused_at_load(tmp_path, pattern, probe):
    bad = tmp_path / "slow.yaml"
    example = "CASE-abX" if pattern.startswith("CASE") else None
    bad.write_text(json.dumps({"kinds": {"slow": {"pattern": pattern, "examples": [example] if example else []}}}))
    with pytest.raises(ConfigError, match=f"kinds.slow.pattern backtracks catastrophically: on [0-9,]+ characters "
                                          f"of {re.escape(probe)}"):
        install(bad)
    assert pii.kinds() == pii.KINDS


def test_a_slow_pattern_the_probes_miss_stops_at_its_budget_with_the_kind_named():
    # Installed around the rules file's checks: the runtime budget is the guard of last resort.
    pii.use_custom_kinds([pii.CustomKind.compile("slow", r"(a|aa)+c", "[SLOW]")])
    with pytest.raises(pii.PiiRuleTimeout, match="the PII rule 'slow' took longer than 50 ms on a 41-character"):
        pii.redact("a" * 40 + "!")
    assert pii.redact("call 13812345678 about aac")[0] == "call [PHONE] about [SLOW]"  # sound texts still pass
    assert pii.rule_budget_s(4_000_000) == pytest.approx(0.45)

