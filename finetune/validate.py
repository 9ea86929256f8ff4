"""Validation: every problem of every row, with its line and a stable code; nothing trains on a row that fails.

Two passes. `check_structure` needs no model: OpenAI's own classes (a row is an object with a non-empty `messages`
list of {role, content[, name, weight]} with known roles and at least one assistant message), and for conversations
that use tools OpenAI's function-calling format: `tools` beside `messages`, assistant `tool_calls` whose arguments are
a JSON object in a string, `tool` messages answering an earlier call by its id. `TokenCheck` renders
each conversation with the model's own chat template through `finetune.masking.ChatEncoder`, the very code the
trainer uses, so `too_long`, `no_trainable_tokens` and `template_render_error` mean exactly what training would hit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.intake import Row
from finetune.masking import ChatEncoder, training_view
from finetune.problems import Problem

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = frozenset({"role", "content", "name", "weight", "tool_calls", "tool_call_id"})
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _short(value: Any) -> str:
    """A value safe to quote in a report: short, and only for role-like labels."""
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


def _content_ok(content: Any) -> bool:
    if isinstance(content, str):
        return bool(content.strip())
    if isinstance(content, list):  # OpenAI content parts; only text parts train
        return bool(content) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                     for p in content) and any(p["text"].strip() for p in content)
    return False


def check_structure(data: Any) -> list[tuple[str, str]]:
    """(code, message) for each distinct problem of one record; empty when the record is well formed."""
    if not isinstance(data, dict):
        return [("data_type", f"expected a JSON object, got {type(data).__name__}")]
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        got = "missing" if messages is None else ("empty" if messages == [] else type(messages).__name__)
        return [("missing_messages_list", f"`messages` must be a non-empty list of messages ({got})")]
    found: dict[str, str] = {}

    def add(code: str, message: str) -> None:
        found.setdefault(code, message)

    tool_names = _check_tools(data.get("tools"), add)
    calls: set[str] = set()  # ids of the calls made so far, which a tool message answers
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            add("data_type", f"message {i} is not a JSON object")
            continue
        if msg.get("role") == "function" or "function_call" in msg:
            # One clear refusal instead of an unknown role, unknown keys and missing content for the same message.
            add("legacy_function_call", f"message {i} uses OpenAI's deprecated `function_call`/`function` format; "
                                         f"write the call as `tool_calls` and its result as a `tool` message")
            continue
        if "role" not in msg:
            add("message_missing_key", f"message {i} has no `role`")
        elif msg["role"] not in ROLES:
            add("unrecognized_role", f"message {i} has role {_short(msg['role'])}; use one of {', '.join(ROLES)}")
        unknown = sorted(str(k) for k in msg.keys() - MESSAGE_KEYS)
        if unknown:
            add("message_unrecognized_key", f"message {i} has key(s) {', '.join(_short(k) for k in unknown)}; "
                                            f"allowed: {', '.join(sorted(MESSAGE_KEYS))}")
        has_calls = "tool_calls" in msg and msg.get("role") == "assistant"
        if has_calls:
            calls |= _check_calls(i, msg["tool_calls"], tool_names, add)
        elif "tool_calls" in msg:
            add("invalid_tool_call", f"message {i}: only assistant messages make `tool_calls`")
        if msg.get("role") == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in calls:
                add("tool_result_without_call", f"message {i} is a tool's result whose `tool_call_id` names no "
                                                f"earlier call of this conversation")
        elif "tool_call_id" in msg:
            add("invalid_tool_call", f"message {i}: only `tool` messages carry a `tool_call_id`")
        if not (has_calls and msg.get("content") in (None, "")) and not _content_ok(msg.get("content")):
            add("missing_content", f"message {i} has no content (it must be a non-empty string)")
        if "weight" in msg and (msg.get("role") != "assistant" or msg["weight"] not in (0, 1)
                                or isinstance(msg["weight"], bool)):
            add("invalid_weight", f"message {i}: `weight` is allowed on assistant messages only, as 0 or 1")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        add("example_missing_assistant_message", "the conversation has no assistant message to learn from")
    return list(found.items())


def _check_tools(tools: Any, add) -> set[str] | None:
    """The function names a row's `tools` define (None when it has none)."""
    if tools is None:
        return None
    names: set[str] = set()
    if not isinstance(tools, list) or not tools:
        add("invalid_tools", "`tools` must be a non-empty list of {\"type\": \"function\", \"function\": {...}}")
        return names
    for j, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type", "function") != "function":
            add("invalid_tools", f"tools[{j}] is not {{\"type\": \"function\", \"function\": {{...}}}}")
        elif not isinstance(fn.get("name"), str) or not _FUNCTION_NAME.fullmatch(fn["name"]):
            add("invalid_tools", f"tools[{j}].function.name must be 1-64 letters, digits, _ or -")
        elif not isinstance(fn.get("parameters", {}), dict) or not isinstance(fn.get("description", ""), str):
            add("invalid_tools", f"tools[{j}].function: `parameters` must be a JSON schema object and "
                                 f"`description` a string")
        else:
            names.add(fn["name"])
    return names


def _check_calls(i: int, calls: Any, tool_names: set[str] | None, add) -> set[str]:
    """The ids of message `i`'s calls, each checked: a function named, arguments a JSON object in a string."""
    if not isinstance(calls, list) or not calls:
        add("invalid_tool_call", f"message {i}: `tool_calls` must be a non-empty list")
        return set()
    ids: set[str] = set()
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        where = f"message {i} tool_calls[{j}]"
        if (not isinstance(fn, dict) or not isinstance(call.get("id"), str)
                or call.get("type", "function") != "function"):
            add("invalid_tool_call", f"{where} must be {{\"id\", \"type\": \"function\", \"function\": "
                                     f"{{\"name\", \"arguments\"}}}}")
            continue
        ids.add(call["id"])
        name, arguments = fn.get("name"), fn.get("arguments")
        if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
            add("invalid_tool_call", f"{where}: function.name must be 1-64 letters, digits, _ or -")
        elif tool_names is not None and name not in tool_names:
            add("unknown_tool", f"{where} calls a function that the row's `tools` do not define")
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            add("invalid_tool_call", f"{where}: function.arguments must be a JSON object written as a string, "
                                     f"as OpenAI's API returns it")
    return ids


def load_encoder(model_dir: Path):
    """The trainer's ChatEncoder for the model store folder (tokenizer and chat template from there, offline)."""
    if not (model_dir / "tokenizer_config.json").is_file() and not (model_dir / "tokenizer.json").is_file():
        raise FinetuneError(f"{model_dir} has no tokenizer files; import the model with `sovereign models import`",
                            code="model_not_found")
    return ChatEncoder.from_model_dir(model_dir)


@dataclass
class TokenStats:
    tokens: int
    trainable: int


class TokenCheck:
    """Renders and tokenizes conversations exactly as training will; maps refusals to problems."""

    def __init__(self, encoder: Any, max_seq_len: int) -> None:
        self.encoder = encoder
        self.max_seq_len = max_seq_len

    def check(self, conversation: Any) -> tuple[tuple[str, str] | None, TokenStats | None]:
        """`conversation`: its messages, or the row ({"messages", "tools"})."""
        try:
            encoded = self.encoder.encode(conversation, max_len=self.max_seq_len)
        except FinetuneError as exc:
            return (exc.code, str(exc)), None
        return None, TokenStats(len(encoded.input_ids), encoded.n_trainable)


@dataclass
class Checked:
    rows: list[Row] = field(default_factory=list)  # rows that passed
    problems: list[Problem] = field(default_factory=list)
    stats: dict[tuple[int, int], TokenStats] = field(default_factory=dict)  # by Row.key, rows that passed tokens


def _problem(row: Row, code: str, message: str, file: str | None) -> Problem:
    # Rows of a compact JSON array share line 1: there only the message can say which record it is.
    return Problem(line=row.line, code=code, message=message if row.record is None else f"{row.where}: {message}",
                   file=file)


def validate_structure(rows: Iterable[Row], file: str | None = None) -> Checked:
    out = Checked()
    for row in rows:
        found = check_structure(row.data)
        if found:
            out.problems += [_problem(row, c, m, file) for c, m in found]
        else:
            out.rows.append(row)
    return out


def validate_tokens(rows: Iterable[Row], check: TokenCheck, file: str | None = None, progress=None) -> Checked:
    out = Checked()
    for row in rows:
        found, stats = check.check(training_view(row.data))
        if found:
            out.problems.append(_problem(row, found[0], found[1], file))
        else:
            out.rows.append(row)
            out.stats[row.key] = stats
        if progress is not None:
            progress()
    return out
