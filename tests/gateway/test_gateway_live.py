"""End to end: the real `openai` SDK → `sovereign gateway` (a process) → the real vLLM CPU server."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import DEFAULT_MODEL
from tests.gateway.gw_stores import request_records

pytestmark = pytest.mark.integration
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
ORDER = [{"role": "user", "content": "Where is my order A1234?"}]
ORDER_TOOL = {"type": "function", "function": {
    "name": "get_order_status", "description": "Look up the status of a customer's order", "strict": True,
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string", "description": "the order number"}},
                   "required": ["order_id"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def key(live_gateway) -> str:
    return live_gateway.make_key("e2e")


def test_chat_through_the_gateway_says_paris(live_gateway, key):
    r = live_gateway.client(key).chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE, temperature=0,
                                                         max_tokens=24)
    assert "paris" in r.choices[0].message.content.lower()
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0


def test_streaming_through_the_gateway(live_gateway, key):
    stream = live_gateway.client(key).chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE, temperature=0,
                                                              max_tokens=24, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "paris" in text.lower()
    assert all(c.usage is None for c in chunks)  # the usage chunk the gateway asked for is not passed on


def test_streaming_with_usage_and_completions(live_gateway, key):
    c = live_gateway.client(key)
    chunks = list(c.chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    r = c.completions.create(model=DEFAULT_MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens > 0


def test_logprobs_against_the_real_engine(live_gateway, key):
    """Logprobs come back through the gateway, whole and streamed (vLLM's CPU engine counts their ranks with our
    plugin, serving/cpu_sampler_ops.py, not a kernel torch.compile builds inside the first such request)."""
    c = live_gateway.client(key)
    r = c.chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE, temperature=0, max_tokens=6, logprobs=True,
                                  top_logprobs=2)
    tokens = r.choices[0].logprobs.content
    assert len(tokens) == r.usage.completion_tokens and "".join(t.token for t in tokens) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in tokens)
    assert tokens[0].logprob == max(top.logprob for top in tokens[0].top_logprobs)  # greedy took the best
    streamed = [t for chunk in c.chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE, temperature=0,
                                                          max_tokens=6, logprobs=True, top_logprobs=2, stream=True)
                if chunk.choices and chunk.choices[0].logprobs for t in chunk.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in tokens]


def test_models_listing_shows_the_served_model(live_gateway, key):
    ids = [m.id for m in live_gateway.client(key).models.list().data]
    assert DEFAULT_MODEL in ids
    hidden = live_gateway.make_key("nothing-allowed", allowed_models=["other-*"])
    assert live_gateway.client(hidden).models.list().data == []


def test_error_cases_against_the_real_engine(live_gateway, key):
    c = live_gateway.client(key)
    with pytest.raises(openai.AuthenticationError) as e401:
        live_gateway.client("sk-sov-wrong").chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE)
    assert e401.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as e404:
        c.chat.completions.create(model="gpt-4o", messages=FRANCE)
    assert e404.value.body["code"] == "model_not_found"
    other = live_gateway.make_key("other-model-only", allowed_models=["other-*"])
    with pytest.raises(openai.PermissionDeniedError) as e403:
        live_gateway.client(other).chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE)
    assert e403.value.body["code"] == "model_not_allowed"
    with pytest.raises(openai.BadRequestError) as e400:
        c.chat.completions.create(model=DEFAULT_MODEL, messages=[])
    assert e400.value.body["param"] == "messages"
    # vLLM's own refusals come back as OpenAI error objects, not 5xx and not vLLM's own types and integer codes.
    with pytest.raises(openai.BadRequestError) as ectx:
        c.completions.create(model=DEFAULT_MODEL, prompt="word " * 6000, max_tokens=4)
    assert ectx.value.body["code"] == "context_length_exceeded"
    assert ectx.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as etype:
        c.chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE, max_tokens=2, extra_body={"top_p": 5})
    assert etype.value.body["param"] == "top_p" and etype.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as eparse:
        c.chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE, max_tokens=2, extra_body={"temperature": "hot"})
    assert eparse.value.body["param"] == "temperature"
    # The default model is a chat model: its vLLM server has no /v1/embeddings route.
    with pytest.raises(openai.NotFoundError) as eemb:
        c.embeddings.create(model=DEFAULT_MODEL, input="hello")
    assert eemb.value.body["code"] == "unsupported_endpoint"
    assert "not an embeddings model" in eemb.value.body["message"]
    blocked = live_gateway.make_key("pii-block", pii="block")
    with pytest.raises(openai.BadRequestError) as epii:
        live_gateway.client(blocked).chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": "My ID is 11010519491231002X"}])
    assert epii.value.body["code"] == "content_policy_violation"
    limited = live_gateway.make_key("one-rpm", requests_per_minute=1)
    lc = live_gateway.client(limited)
    lc.chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as e429:
        lc.chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE, max_tokens=2)
    assert e429.value.response.headers["retry-after"]
    r = httpx.post(f"{live_gateway.url}/v1/chat/completions", content=b"x" * (5 * 1024 * 1024),
                   headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_gateway_metrics_after_real_traffic(live_gateway, key):
    live_gateway.client(key).chat.completions.create(model=DEFAULT_MODEL, messages=FRANCE, max_tokens=4)
    text = httpx.get(f"{live_gateway.url}/metrics").text
    assert f'sovereign_gateway_tokens_total{{kind="completion",model="{DEFAULT_MODEL}",team="e2e"}}' in text
    assert "sovereign_gateway_audit_write_seconds_count" in text


def test_responses_api_against_the_real_engine(live_gateway, key):
    c = live_gateway.client(key)
    r = c.responses.create(model=DEFAULT_MODEL, input="What is the capital of France?", temperature=0,
                           max_output_tokens=16)
    assert "Paris" in r.output_text and r.usage.output_tokens > 0
    events = list(c.responses.create(model=DEFAULT_MODEL, input="What is the capital of France?", temperature=0,
                                     max_output_tokens=16, stream=True))
    assert "Paris" in "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].type == "response.completed" and events[-1].response.usage.output_tokens > 0


def test_tool_calls_against_the_real_engine(live_gateway):
    """OpenAI's `tools` with the default model: a named or required function gets a call whose arguments fit the
    tool's schema, whole or streamed; the tool's result is read in the next turn; the audit keeps the call.

    This model knows no tool format: vLLM's structural tag spells hermes' `<tool_call>` out for it a few characters a
    token, ~70 tokens for this call, so max_tokens leaves room for that."""
    c = live_gateway.client(live_gateway.make_key("e2e-tools", audit_content="redacted"))
    named = {"type": "function", "function": {"name": "get_order_status"}}
    calls = []
    for choice in (named, "required"):
        r = c.chat.completions.create(model=DEFAULT_MODEL, messages=ORDER, tools=[ORDER_TOOL], tool_choice=choice,
                                      temperature=0, max_tokens=160)
        [call] = r.choices[0].message.tool_calls
        assert call.function.name == "get_order_status"
        args = json.loads(call.function.arguments)
        assert list(args) == ["order_id"] and isinstance(args["order_id"], str)
        calls.append(call)
    streamed = {"name": "", "arguments": ""}
    for chunk in c.chat.completions.create(model=DEFAULT_MODEL, messages=ORDER, tools=[ORDER_TOOL], tool_choice=named,
                                           temperature=0, max_tokens=160, stream=True):
        for part in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            streamed["name"] += part.function.name or ""
            streamed["arguments"] += part.function.arguments or ""
    # the same call; vLLM re-serializes a whole answer's arguments but streams them as the model wrote them
    assert streamed["name"] == "get_order_status"
    assert json.loads(streamed["arguments"]) == json.loads(calls[0].function.arguments)

    rows = request_records(f"sqlite:///{live_gateway.log_path.parent / 'gateway.db'}")[-3:]
    assert [row["completion"] for row in rows] == [f"[tool_call get_order_status] {args}" for args in (
        calls[0].function.arguments, calls[1].function.arguments, streamed["arguments"])]

    # "auto" (what the SDK sends when tool_choice is left out) is served too: this model answers in text
    r = c.chat.completions.create(model=DEFAULT_MODEL, messages=ORDER, tools=[ORDER_TOOL], temperature=0, max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    call = calls[0]
    turn = ORDER + [{"role": "assistant", "content": None, "tool_calls": [
                        {"id": call.id, "type": "function",
                         "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
                    {"role": "tool", "tool_call_id": call.id, "content": '{"status": "shipped", "eta": "Friday"}'}]
    r = c.chat.completions.create(model=DEFAULT_MODEL, messages=turn, tools=[ORDER_TOOL], temperature=0,
                                  max_tokens=24)
    assert r.choices[0].message.content and r.usage.prompt_tokens > 0


def _running_on(vllm_server) -> float:
    text = httpx.get(f"{vllm_server.base_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running"))


def test_a_client_that_leaves_a_long_answer_stops_the_engine_generating(live_gateway, key, vllm_server):
    # A non-streamed answer of 2,000 forced tokens takes minutes on this CPU; the client gives up after 2 s. The
    # gateway hangs up on vLLM, which aborts the request: the engine is idle again within seconds, not minutes.
    import time

    with pytest.raises(openai.APITimeoutError):
        live_gateway.client(key).with_options(timeout=2, max_retries=0).chat.completions.create(
            model=DEFAULT_MODEL, messages=FRANCE, max_tokens=2000, extra_body={"ignore_eos": True, "min_tokens": 2000})
    deadline = time.monotonic() + 20
    while (running := _running_on(vllm_server)) > 0:
        assert time.monotonic() < deadline, f"vLLM still generating for nobody ({running:g} running)"
        time.sleep(0.2)
