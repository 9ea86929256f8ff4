"""PII scrubbing of what a tool-using conversation carries besides its messages' text."""

from __future__ import annotations

import json

import pytest

from finetune.errors import FinetuneError
from finetune.intake import Row
from finetune.scrub import scrub_rows
from sovereign import pii


def test_tool_call_arguments_results_and_tool_schemas_are_scrubbed_and_stay_valid_json():
    tools = [{"type": "function", "function": {
        "name": "lookup_customer", "description": "Find a customer, e.g. by li.lei@example.com",
        "parameters": {"type": "object", "required": ["phone"],
                       "properties": {"phone": {"type": "string", "examples": ["13812345678"]}}}}}]
    arguments = json.dumps({"phone": "13812345678", "card": 4111111111111111, "note": "plain"})
    row = Row(7, {"tools": tools, "messages": [
        {"role": "user", "content": "My number is 13812345678"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "lookup_customer", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"email": "li.lei@example.com"}'},
        {"role": "assistant", "content": "Found you."}]})
    [out], report = scrub_rows([row])
    dumped = json.dumps(out.data, ensure_ascii=False)
    for value in ("13812345678", "li.lei@example.com", "4111111111111111"):
        assert value not in dumped
    call = out.data["messages"][1]["tool_calls"][0]["function"]
    assert json.loads(call["arguments"]) == {"phone": "[PHONE]", "card": "[BANK_CARD]", "note": "plain"}
    assert call["name"] == "lookup_customer"
    schema = out.data["tools"][0]["function"]
    assert schema["parameters"]["required"] == ["phone"] and schema["parameters"]["properties"]["phone"]["type"] == \
        "string" and schema["description"] == "Find a customer, e.g. by [EMAIL]"
    assert report.counts["phone"] == 3 and report.counts["email"] == 2 and report.counts["bank_card"] == 1
    assert report.changed_lines == [7] and row.data["tools"] == tools  # the input is left untouched


def test_a_pii_rule_past_its_time_budget_fails_the_scrub_naming_the_rule_and_line():
    pii.use_custom_kinds([pii.CustomKind.compile("slow_case", r"(a|aa)+c", "[SLOW_CASE]")])  # cleared by conftest
    rows = [Row(3, {"messages": [{"role": "user", "content": "aac"}, {"role": "assistant", "content": "ok"}]}),
            Row(9, {"messages": [{"role": "user", "content": "a" * 40}, {"role": "assistant", "content": "ok"}]})]
    with pytest.raises(FinetuneError, match="line 9: the PII rule 'slow_case' took longer") as err:
        scrub_rows(rows)
    assert err.value.code == "pii_rule_timeout"
