"""What the request path checks before anything else: the caller's key in the headers, the declared body size, and
the fields of a request body the gateway itself relies on (the model server validates the rest)."""

from __future__ import annotations

from typing import Any

from gateway import errors as E
from gateway import responses_api
from gateway.accounts import MAX_INT32


def bearer(scope: dict) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
        if name == b"api-key":  # Azure-style clients
            return value.decode("latin-1").strip() or None
    return None


def content_length(scope: dict) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _int_field(body: dict, name: str, minimum: int) -> None:
    value = body.get(name)
    if value is None:
        return
    if type(value) is not int or not minimum <= value <= MAX_INT32:  # reservations stay exact in Redis's Lua
        raise E.invalid_request(f"`{name}` must be an integer from {minimum} to {MAX_INT32}, got {value!r}"[:300],
                                param=name)


ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})  # OpenAI's, as vLLM takes them
# vLLM's structured-output fields before `structured_outputs`: vLLM now ignores them, so the answer would come back
# unconstrained with a 200 and nothing to tell the client why.
REMOVED_GUIDED = frozenset({"guided_json", "guided_regex", "guided_choice", "guided_grammar",
                            "guided_decoding_backend", "guided_whitespace_pattern"})


def validate(body: Any, kind: str) -> str:
    """Check the fields the gateway itself relies on; the upstream validates the rest. Returns the model."""
    if not isinstance(body, dict):
        raise E.invalid_request("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise E.invalid_request("`model` is required and must be a non-empty string.", param="model")
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise E.invalid_request("`messages` must be a non-empty array of {role, content} objects.",
                                    param="messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise E.invalid_request(f"messages[{i}] must be an object with a string `role`.",
                                        param=f"messages.{i}")
            if m["role"] not in ROLES:
                # The template writes the role into the prompt as it is: any other string is text no policy reads.
                raise E.invalid_request(f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}; got "
                                        f"{m['role'][:40]!r}", param=f"messages.{i}.role")
    elif kind == "completions":
        prompt = body.get("prompt")
        ok = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and (
            all(isinstance(p, str) for p in prompt) or all(type(p) is int for p in prompt)
            or all(isinstance(p, list) and all(type(t) is int for t in p) for p in prompt)))
        if not ok:
            raise E.invalid_request("`prompt` must be a string, an array of strings or an array of token ids.",
                                    param="prompt")
    elif kind == "embeddings":
        inp = body.get("input")
        if not (isinstance(inp, str) or (isinstance(inp, list) and inp)):
            raise E.invalid_request("`input` must be a string or a non-empty array.", param="input")
    elif kind == "responses":
        responses_api.validate(body)
        _int_field(body, "max_output_tokens", 1)
        return model
    if kind != "embeddings":
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise E.invalid_request("`stream` must be a boolean.", param="stream")
        so = body.get("stream_options")
        if so is not None and (not isinstance(so, dict) or not isinstance(so.get("include_usage", False), bool)):
            raise E.invalid_request("`stream_options` must be an object like {\"include_usage\": true}.",
                                    param="stream_options")
        _int_field(body, "max_tokens", 1)
        _int_field(body, "max_completion_tokens", 1)
        _int_field(body, "n", 1)
        if not REMOVED_GUIDED.isdisjoint(body):
            name = min(REMOVED_GUIDED.intersection(body))
            raise E.GatewayError(400, f"`{name}` is no longer read by the model server (vLLM removed the guided_* "
                                      f"fields), so the answer would not be constrained. Use `structured_outputs` "
                                      f"({{\"json\": schema}}, {{\"choice\": [...]}}, {{\"regex\": ...}} or "
                                      f"{{\"grammar\": ...}}) or OpenAI's `response_format`.",
                                 code="unsupported_parameter", param=name)
    return model
