"""OpenAI's Responses API (`POST /v1/responses`) on the request path: what differs from chat completions.

vLLM serves it statelessly here: it keeps no responses unless VLLM_ENABLE_RESPONSES_API_STORE is set, which the
platform never does (a conversation held in a replica's memory would be lost on restart and unreachable from the
others). So a request carries its whole conversation; `previous_response_id` is refused with that reason up front.
A stream is typed events (`event: response.output_text.delta` + `data: {...}`) ending with `response.completed`,
`response.incomplete` or `response.failed`, whose `response.usage` counts input_tokens and output_tokens; there is no
`data: [DONE]`, and an error in the middle is an `event: error`.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway import errors as E
from gateway.audit import add_tool_call
from gateway.upstream import event_json

PATH = "/v1/responses"
FINAL = (b"response.completed", b"response.incomplete", b"response.failed", b"error")
DELTA = b"response.output_text.delta"
ARGUMENTS_DELTA = b"response.function_call_arguments.delta"
REASONING_DELTA = b"response.reasoning_text.delta"
ITEM_ADDED = b"response.output_item.added"


def validate(body: dict) -> None:
    """The fields the gateway relies on; vLLM validates the rest."""
    inp = body.get("input")
    if not (isinstance(inp, str) or (isinstance(inp, list) and inp)):
        raise E.invalid_request("`input` must be a string or a non-empty array of input items.", param="input")
    for i, item in enumerate(inp if isinstance(inp, list) else ()):
        if not isinstance(item, dict):
            raise E.invalid_request(f"input[{i}] must be an object (a message or another input item).",
                                    param=f"input.{i}")
    if body.get("previous_response_id") is not None or body.get("conversation") is not None:
        param = "previous_response_id" if body.get("previous_response_id") is not None else "conversation"
        raise E.invalid_request("This platform keeps no responses or conversations between requests; send the "
                                "whole conversation as `input` instead.", param=param)
    if body.get("instructions") is not None and not isinstance(body["instructions"], str):
        raise E.invalid_request("`instructions` must be a string.", param="instructions")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise E.invalid_request("`stream` must be a boolean.", param="stream")


def texts(body: dict) -> list[tuple[Any, str | int, str]]:
    """(container, key, text) for every text the model will read, so redaction can write back in place. `tools` are
    read by the policy, which handles them alike for chat completions."""
    out: list[tuple[Any, str | int, str]] = []
    if isinstance(body.get("instructions"), str):
        out.append((body, "instructions", body["instructions"]))
    inp = body.get("input")
    if isinstance(inp, str):
        out.append((body, "input", inp))
        return out
    for item in inp:
        # A message's participant name; other items' `name` is a tool's, which must still match its definition.
        if item.get("type", "message") == "message" and isinstance(item.get("name"), str):
            out.append((item, "name", item["name"]))
        # message content; function_call_output's output; function_call's arguments; custom_tool_call's input;
        # a reasoning item's summary: each a string or a list of parts with `text`.
        for key in ("content", "output", "arguments", "input", "summary"):
            value = item.get(key)
            if isinstance(value, str):
                out.append((item, key, value))
            elif isinstance(value, list):
                out.extend((part, "text", part["text"]) for part in value
                           if isinstance(part, dict) and isinstance(part.get("text"), str))
    return out


def usage(response: dict) -> tuple[int, int] | None:
    """(input, output) tokens of a response object, if it says."""
    u = response.get("usage")
    if not isinstance(u, dict):
        return None
    return int(u.get("input_tokens") or 0), int(u.get("output_tokens") or 0)


def output_texts(response: dict) -> list[str]:
    """What a response says, for the audit: its messages' text, and each function call as `[tool_call NAME]
    ARGUMENTS` (as chat completions' tool calls are shown); its reasoning is `reasoning_texts`."""
    out = []
    for item in response.get("output") or ():
        if not isinstance(item, dict) or item.get("type") == "reasoning":
            continue
        if item.get("type") == "function_call":
            add_tool_call(item, out)
            continue
        content = item.get("content")
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
    return out


def reasoning_texts(response: dict) -> list[str]:
    """What a response's reasoning items say (their text and their summary), for the audit."""
    out = []
    for item in response.get("output") or ():
        if isinstance(item, dict) and item.get("type") == "reasoning":
            for key in ("content", "summary"):
                parts = item.get(key)
                if isinstance(parts, list):
                    out.extend(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))
    return out


class ResponseEvents:
    """One Responses stream as it passes: text and usage for the audit and quotas, the final event held back."""

    __slots__ = ("ex", "parts", "done", "failed", "chunks", "tail", "seq")

    def __init__(self, ex: Any) -> None:
        self.ex = ex
        self.parts: list[str] | None = ex.completion_parts
        self.done = self.failed = False
        self.chunks = self.seq = 0
        self.tail: list[bytes] = []

    def take(self, event: bytes) -> bool:
        """Whether to forward `event` now; the final one waits until the audit record is durable."""
        self.seq += 1
        kind = event[7:event.find(b"\n")].strip() if event.startswith(b"event: ") else b""
        if kind.endswith(b".delta"):  # text, reasoning, tool-call arguments: a token each, billed if cut off
            self.chunks += 1
            if (kind == DELTA or kind == ARGUMENTS_DELTA or kind == REASONING_DELTA) and self.parts is not None \
                    and (obj := event_json(event)) is not None and isinstance(obj.get("delta"), str):
                (self.ex.reasoning() if kind == REASONING_DELTA else self.parts).append(obj["delta"])
            return True
        if kind == ITEM_ADDED and self.parts is not None and b'"function_call"' in event:
            item = (event_json(event) or {}).get("item")
            if isinstance(item, dict) and item.get("type") == "function_call":
                add_tool_call({"name": item.get("name")}, self.parts)  # its arguments follow in delta events
        if kind in FINAL:
            obj = event_json(event)
            response = obj.get("response") if obj is not None else None
            if isinstance(response, dict) and (counts := usage(response)) is not None:
                self.ex.prompt_tokens, self.ex.completion_tokens = counts
            self.done = True
            self.failed = kind in (b"response.failed", b"error")
            self.tail.append(event)
            return False
        return True

    def flush(self) -> None:
        """Nothing waits: a Responses stream's text deltas are few next to its other events."""

    def end(self) -> bytes:
        return b"".join(self.tail)

    def error(self, err: E.GatewayError) -> bytes:
        """An in-band failure as the Responses API streams one (the SDK's ResponseErrorEvent)."""
        return b"event: error\ndata: " + orjson.dumps({"type": "error", "code": err.openai_code or err.type,
                                                       "message": err.message, "param": err.param,
                                                       "sequence_number": self.seq}) + b"\n\n"
