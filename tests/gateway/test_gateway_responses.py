"""OpenAI's Responses API through the gateway: the unchanged SDK's `client.responses`, with policy, quotas and audit."""

from __future__ import annotations

import hashlib
import json

import httpx
import openai
import pytest

from tests.gateway.test_gateway_policy_audit import PII_TEXT, audit_rows


def test_a_response_and_its_audit_record(gw, upstream):
    r = gw.client(gw.key()).responses.create(model="fake-model", input="hello there", instructions="Be brief.")
    assert r.output_text == "Echo: hello there"
    row = audit_rows(gw)[-1]
    assert row["status"] == 200 and (row["prompt_tokens"], row["completion_tokens"]) == (2, 3)
    assert row["completion"] == "sha256:" + hashlib.sha256(b"Echo: hello there").hexdigest()
    assert row["prompt"] == "sha256:" + hashlib.sha256(b"Be brief.\nhello there").hexdigest()
    assert "stream_options" not in upstream.requests[-1]


def test_a_streamed_response_ends_with_its_completed_event_after_the_audit(gw):
    events = list(gw.client(gw.key()).responses.create(model="fake-model", stream=True, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "hello there"}]}]))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Echo: hello there"
    assert events[-1].type == "response.completed" and events[-1].response.usage.output_tokens == 3
    row = audit_rows(gw)[-1]
    assert row["status"] == 200 and (row["prompt_tokens"], row["completion_tokens"]) == (2, 3)
    assert row["completion"] == "sha256:" + hashlib.sha256(b"Echo: hello there").hexdigest()


def test_a_function_call_is_in_the_audit_record_streamed_or_not(gw):
    c = gw.client(gw.key("responses-agents", audit_content="redacted"))
    whole = c.responses.create(model="fake-model", input="__tool__ refund order 4417 for li.lei@example.com")
    call = whole.output[0]
    assert call.type == "function_call" and call.name == "lookup_order"
    events = list(c.responses.create(model="fake-model", stream=True,
                                     input="__tool__ refund order 4417 for li.lei@example.com"))
    streamed = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert streamed == call.arguments and events[-1].type == "response.completed"
    expected = "[tool_call lookup_order] " + call.arguments.replace("li.lei@example.com", "[EMAIL]")
    assert [row["completion"] for row in audit_rows(gw)[-2:]] == [expected, expected]


def test_a_reasoning_item_is_in_the_audit_record_streamed_or_not(gw):
    c = gw.client(gw.key("responses-thinkers", audit_content="redacted"))
    prompt = "__think__ mail li.lei@example.com"
    whole = c.responses.create(model="fake-model", input=prompt)
    assert [item.type for item in whole.output] == ["reasoning", "message"]
    events = list(c.responses.create(model="fake-model", stream=True, input=prompt))
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert thought == whole.output[0].content[0].text == "Thinking about: " + prompt
    expected = f"[reasoning] {thought}\n[answer] Echo: {prompt}".replace("li.lei@example.com", "[EMAIL]")
    assert [row["completion"] for row in audit_rows(gw)[-2:]] == [expected, expected]


def test_a_stream_that_breaks_ends_with_an_error_event(gw):
    with httpx.stream("POST", f"{gw.url}/v1/responses", headers={"Authorization": f"Bearer {gw.key()}"}, timeout=30,
                      json={"model": "fake-model", "input": "__die__ a b c", "stream": True}) as r:
        body = b"".join(r.iter_raw())
    last = body.rstrip().split(b"\n\n")[-1]
    assert last.startswith(b"event: error\ndata: ")
    error = json.loads(last.split(b"data: ", 1)[1])
    assert error["type"] == "error" and error["code"] == "upstream_error" and error["sequence_number"] >= 2
    assert audit_rows(gw)[-1]["status"] == 502


def test_policy_reads_instructions_and_every_input_item(gw, upstream):
    c = gw.client(gw.key("careful", pii="redact", max_tokens=5))
    c.responses.create(model="fake-model", instructions=PII_TEXT, max_output_tokens=50, input=[
        {"role": "user", "content": [{"type": "input_text", "text": PII_TEXT}]},
        {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": json.dumps({"q": PII_TEXT})},
        {"type": "function_call_output", "call_id": "c1", "output": PII_TEXT}])
    sent = upstream.requests[-1]
    assert "13812345678" not in json.dumps(sent) and "[PHONE]" in sent["instructions"]
    assert sent["max_output_tokens"] == 5  # the team's cap
    c.responses.create(model="fake-model", input="hi")
    assert upstream.requests[-1]["max_output_tokens"] == 5  # set when the request names none


def test_policy_reads_function_tools_and_leaves_tool_names_and_other_tools_alone(gw, upstream):
    tools = [{"type": "web_search"},
             {"type": "function", "name": "lookup", "description": PII_TEXT, "parameters": {
                 "type": "object", "properties": {"phone": {"type": "string", "enum": ["13812345678"]}},
                 "required": ["phone"]}}]
    c = gw.client(gw.key("careful", pii="redact", audit_content="redacted"))
    c.responses.create(model="fake-model", input="look me up", tools=tools)
    sent = upstream.requests[-1]["tools"]
    assert "13812345678" not in json.dumps(sent) and "li.lei@example.com" not in json.dumps(sent)
    assert "[PHONE]" in sent[1]["description"] and sent[1]["parameters"]["properties"]["phone"]["enum"] == ["[PHONE]"]
    assert sent[0] == tools[0] and sent[1]["name"] == "lookup" and sent[1]["parameters"]["required"] == ["phone"]
    row = audit_rows(gw)[-1]
    assert row["policy"]["pii"]["counts"] == {"phone": 2, "email": 1} and "13812345678" not in row["prompt"]
    with pytest.raises(openai.BadRequestError) as err:
        gw.client(gw.key("strict", pii="block")).responses.create(model="fake-model", input="hi", tools=tools)
    assert err.value.body["code"] == "content_policy_violation"


def test_max_output_tokens_is_reserved_against_the_budget(gw):
    c = gw.client(gw.key("small", limits={"daily_tokens": 50}))
    with pytest.raises(openai.RateLimitError) as err:
        c.responses.create(model="fake-model", input="hi", max_output_tokens=100)
    assert err.value.body["code"] == "insufficient_quota"
    assert c.responses.create(model="fake-model", input="hi", max_output_tokens=10).output_text


def test_no_state_is_kept_between_requests(gw):
    c = gw.client(gw.key())
    with pytest.raises(openai.BadRequestError) as err:
        c.responses.create(model="fake-model", input="and then?", previous_response_id="resp_1")
    assert err.value.body["param"] == "previous_response_id" and "whole conversation" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError) as err:
        c.responses.retrieve("resp_1")
    assert err.value.body["code"] == "response_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        c.responses.create(model="fake-model", input=[])
    assert err.value.body["param"] == "input"


@pytest.mark.parametrize("item", [
    {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": PII_TEXT}]},
    {"type": "reasoning", "id": "r1", "summary": [{"type": "summary_text", "text": PII_TEXT}]},
    {"type": "custom_tool_call", "call_id": "c2", "name": "shell", "input": PII_TEXT},
    {"role": "developer", "content": PII_TEXT},
    {"type": "message", "role": "user", "name": "li.lei@example.com", "content": "hi"},
])
def test_every_input_item_shape_is_read_by_the_policy(item):
    from gateway.directory import TeamPolicy
    from gateway.errors import GatewayError
    from gateway.policy import apply_policy

    strict = TeamPolicy(name="s", allowed_models=("*",), max_tokens=None, pii="block", injection="off",
                        audit_content="hash", limits=(None,) * 4)
    with pytest.raises(GatewayError) as err:
        apply_policy(strict, {"model": "m", "input": [{"role": "user", "content": "hi"}, item]}, "responses")
    assert err.value.openai_code == "content_policy_violation"


def test_cut_off_streams_bill_every_delta_and_an_upstream_error_ends_the_stream():
    from gateway.proxy import Exchange
    from gateway.responses_api import ResponseEvents

    ex = Exchange("req_1", 0.0, None, "responses")
    ex.completion_parts = []
    events = ResponseEvents(ex)
    for kind in ("response.reasoning_text.delta", "response.function_call_arguments.delta",
                 "response.output_text.delta"):
        assert events.take(b"event: " + kind.encode() + b'\ndata: {"delta": "x"}\n\n')
    # every delta is billed; the audit keeps what the model said, function-call arguments included, and apart from
    # that its reasoning
    assert events.chunks == 3 and events.parts == ["x", "x"] and ex.reasoning_parts == {0: ["x"]}
    assert not events.done
    assert not events.take(b'event: error\ndata: {"type": "error", "code": "x", "message": "m"}\n\n')
    assert events.done and events.failed and events.end().startswith(b"event: error")


def test_fields_the_responses_api_does_not_have_are_left_to_the_server(gw):
    c = gw.client(gw.key("quota", limits={"daily_tokens": 10_000}))
    assert c.responses.create(model="fake-model", input="hi", extra_body={"n": "two"}).output_text
