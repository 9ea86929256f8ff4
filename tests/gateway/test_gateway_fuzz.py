"""Property-based: whatever a client sends, the gateway answers 2xx or a clear 4xx OpenAI error, never a 5xx."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

json_scalars = st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]) | json_values,
                                           "content": st.text(max_size=40) | json_values}), max_size=3) | json_values
chat_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["fake-model", "support@1", "unknown", ""]) | json_values, "messages": messages},
    optional={"max_tokens": st.integers(-5, 50) | json_values, "stream": st.booleans() | json_values,
              "stream_options": json_values | st.fixed_dictionaries({"include_usage": json_values}),
              "n": st.integers(-1, 3) | json_values, "temperature": json_values})
completion_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["fake-model", "nope"]) | json_values,
     "prompt": st.text(max_size=30) | st.lists(st.integers(0, 100), max_size=4) | json_values},
    optional={"max_tokens": st.integers(-5, 50) | json_values, "stream": st.booleans() | json_values})


def assert_clean_answer(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["message"] and err["type"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]"), r.text


@pytest.fixture()
def client(gw):
    with httpx.Client(base_url=gw.url, timeout=30, headers={"Authorization": f"Bearer {gw.key()}"}) as c:
        yield c


FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))


def test_chat_bodies_never_cause_a_5xx(client):
    @FUZZ
    @given(chat_bodies)
    def check(body):
        assert_clean_answer(client.post("/v1/chat/completions", json=body))

    check()


def test_completion_bodies_never_cause_a_5xx(client):
    @FUZZ
    @given(completion_bodies)
    def check(body):
        assert_clean_answer(client.post("/v1/completions", json=body))

    check()


def test_arbitrary_bytes_and_headers_never_cause_a_5xx(client):
    @FUZZ
    @given(st.binary(max_size=200), st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                                      "/v1/models", "/v1/x", "/admin/teams"]),
           st.sampled_from(["GET", "POST", "PUT", "DELETE"]))
    def check(raw, path, method):
        assert_clean_answer(client.request(method, path, content=raw))

    check()


def test_keys_of_every_shape_are_401_not_5xx(gw):
    @FUZZ
    @given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=80))
    def check(key):
        r = httpx.post(f"{gw.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "fake-model", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"

    check()
