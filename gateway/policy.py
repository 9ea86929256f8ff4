"""A team's policy applied to one request body: max_tokens cap, PII off/redact/block, prompt-injection flag/block.

Works on the parsed JSON dict in place (no pydantic per request). Returns what it decided, for the audit record and
the logs; the decisions never contain the text itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from gateway import responses_api
from gateway.directory import TeamPolicy
from gateway.errors import content_policy, invalid_request, pii_rule_timeout
from gateway.injection import detect_injection
from sovereign import pii

log = logging.getLogger("sovereign.gateway.policy")

Triple = tuple[Any, str | int, str]  # (container, key, text): where a text is, so redaction writes back in place


@dataclass(slots=True)
class PolicyOutcome:
    prompt_text: str  # the prompt as forwarded upstream (redacted when the policy redacts)
    max_tokens: int | None  # the effective completion budget, None when neither request nor policy sets one
    decisions: dict[str, Any] = field(default_factory=dict)
    token_ids: int = 0  # prompt tokens sent as ids rather than text (counted, not read)


def _chat_texts(body: dict) -> list[tuple[Any, str | int, str]]:
    """(container, key, text) for every text of the conversation the model will read, so redaction can write back in
    place: message contents and parts, earlier tool calls' arguments, and vLLM's `documents` for the chat template."""
    out: list[tuple[Any, str | int, str]] = []
    for i, m in enumerate(body["messages"]):
        if not isinstance(m, dict):
            raise invalid_request(f"messages[{i}] must be an object with `role` and `content`", param=f"messages.{i}")
        if isinstance(m.get("name"), str):  # a participant's name, rendered beside its message
            out.append((m, "name", m["name"]))
        calls = m.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                out.append((fn, "arguments", fn["arguments"]))
        legacy = m.get("function_call")
        if isinstance(legacy, dict) and isinstance(legacy.get("arguments"), str):
            out.append((legacy, "arguments", legacy["arguments"]))
        content = m.get("content")
        if isinstance(content, str):
            out.append((m, "content", content))
        elif isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    out.append((part, "text", part["text"]))
                elif not isinstance(part, dict):
                    raise invalid_request(f"messages[{i}].content[{j}] must be an object", param=f"messages.{i}")
        elif content is not None:
            raise invalid_request(f"messages[{i}].content must be a string, a list of parts or null",
                                  param=f"messages.{i}.content")
    documents = body.get("documents")
    for doc in documents if isinstance(documents, list) else ():
        if isinstance(doc, dict):
            out.extend((doc, k, v) for k, v in doc.items() if isinstance(v, str))
    return out


_SCHEMA_DEPTH = 64  # generated schemas nest a few levels ($defs keep them flat); the bound keeps recursion shallow
# A schema's `type` values: the most frequent strings in any tool list, and never personal data.
_SCHEMA_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})


def _tool_texts(body: dict, kind: str) -> tuple[list[Triple], dict[str, str]]:
    """What the chat template shows the model of the request's tools: each function's description and every string
    of its JSON schema as (container, key, text), and the schemas' property names as {name: where}.

    Tool names are left out: redacted, they would no longer match the model's tool calls. Property names cannot be
    redacted either (`required` and the model's arguments name them), so they are returned apart for a verdict.
    A shape vLLM would refuse (tools not a list, a tool not an object, ...) is skipped: its 400 is relayed."""
    texts: list[Triple] = []
    names: dict[str, str] = {}
    tools = body.get("tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else ()):
        if not isinstance(tool, dict):
            continue
        if kind == "responses":  # flat: {"type": "function", "name", "description", "parameters"}
            _function_texts(tool, f"tools[{i}]", texts, names)
        elif isinstance(tool.get("function"), dict):
            _function_texts(tool["function"], f"tools[{i}].function", texts, names)
    legacy = body.get("functions") if kind == "chat" else None
    for i, fn in enumerate(legacy if isinstance(legacy, list) else ()):
        if isinstance(fn, dict):
            _function_texts(fn, f"functions[{i}]", texts, names)
    return texts, names


def _function_texts(fn: dict, where: str, texts: list[Triple], names: dict[str, str]) -> None:
    if isinstance(fn.get("description"), str):
        texts.append((fn, "description", fn["description"]))
    if isinstance(fn.get("parameters"), dict):
        _schema_texts(fn["parameters"], f"{where}.parameters", 0, texts, names)


def _schema_texts(node: dict | list, where: str, depth: int, texts: list[Triple], names: dict[str, str]) -> None:
    """Every string in a schema, whatever its keyword (description, title, enum, default, examples, const, ...):
    the template renders the schema whole."""
    if depth >= _SCHEMA_DEPTH:
        raise invalid_request(f"`{where}` is nested more than {_SCHEMA_DEPTH} levels deep.", param=_param(where))
    pairs = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in pairs:
        if isinstance(key, str):
            names.setdefault(key, where)
        if isinstance(value, str):
            if not (key == "type" and value in _SCHEMA_TYPES):
                texts.append((node, key, value))
        elif isinstance(value, (dict, list)):
            _schema_texts(value, where, depth + 1, texts, names)


# Where a request constrains the answer's shape: OpenAI's response_format (chat, completions) and the Responses API's
# text.format, and vLLM's structured_outputs (its older guided_* fields are refused up front: request_checks.validate).
_FORMAT_KEYS = ("response_format", "text", "structured_outputs")


def _format_texts(body: dict, kind: str, texts: list[Triple], names: dict[str, str]) -> None:
    """Every string of the JSON schemas and choice lists that constrain the answer. The model is not shown them, but
    the answer is held to them: an enum, const or choice holding personal data becomes the answer's text."""
    found: list[tuple[Any, str]] = []
    if kind == "responses":
        text = body.get("text")
        fmt, where = (text.get("format") if isinstance(text, dict) else None), "text.format.schema"
    else:
        rf = body.get("response_format")
        fmt, where = (rf.get("json_schema") if isinstance(rf, dict) else None), "response_format.json_schema.schema"
    if isinstance(fmt, dict) and isinstance(fmt.get("schema"), dict):
        found.append((fmt["schema"], where))
    so = body.get("structured_outputs")
    for key in ("json", "choice"):
        if isinstance(so, dict) and isinstance(so.get(key), (dict, list)):
            found.append((so[key], f"structured_outputs.{key}"))
    for node, where in found:
        _schema_texts(node, where, 0, texts, names)


def _param(where: str) -> str:
    """`tools[0].function.parameters` as the error's `param`, in the dotted form the other refusals use."""
    return where.replace("[", ".").replace("]", "")


def _completion_texts(body: dict, field: str = "prompt") -> list[tuple[Any, str | int, str]]:
    prompt = body.get(field)
    out: list[tuple[Any, str | int, str]] = []
    if isinstance(prompt, str):
        out.append((body, field, prompt))
    elif isinstance(prompt, list):
        out.extend((prompt, i, p) for i, p in enumerate(prompt) if isinstance(p, str))
    if field == "prompt" and isinstance(body.get("suffix"), str):
        out.append((body, "suffix", body["suffix"]))
    return out


def _token_ids(body: dict, field: str) -> int:
    """How many prompt tokens are sent as ids: a list of ints, or a list of such lists."""
    prompt = body.get(field)
    if not isinstance(prompt, list) or not prompt:
        return 0
    if all(type(p) is int for p in prompt):
        return len(prompt)
    return sum(len(p) for p in prompt if isinstance(p, list))


def _cap_max_tokens(body: dict, cap: int | None, decisions: dict,
                    names: tuple[str, ...] = ("max_tokens", "max_completion_tokens")) -> int | None:
    effective = None
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if cap is not None and value > cap:
            body[name] = value = cap
            decisions["max_tokens_capped"] = cap
        effective = value if effective is None else min(effective, value)
    if effective is None and cap is not None:
        body[names[0]] = effective = cap
    return effective


def _blocked(message: str, decisions: dict) -> Exception:
    exc = content_policy(message)
    exc.decisions = decisions  # type: ignore[attr-defined]  # so the audit record says why
    return exc


def _refuse_personal_names(names: dict[str, str], decisions: dict) -> None:
    """pii=redact cannot rewrite a schema's property name (`required` and the model's arguments name it), nor let
    it through: the client must rename it."""
    for name, where in names.items():
        kinds = sorted({m.kind for m in pii.find_pii(name)})
        if kinds:
            decisions["pii"] = {"action": "refused", "kinds": kinds}
            exc = invalid_request(f"`{where}` has a property name containing personal data ({', '.join(kinds)}); "
                                  f"rename it: a name cannot be redacted without breaking the schema and the "
                                  f"model's tool calls.", param=_param(where))
            exc.decisions = decisions  # type: ignore[attr-defined]  # so the audit record says why
            raise exc


def _apply_pii(action: str, texts: list[Triple], names: dict[str, str], decisions: dict) -> list[Triple]:
    """pii=block refuses texts with personal data; pii=redact rewrites them in their containers and returns them."""
    if action == "block":
        kinds = sorted({m.kind for _, _, t in texts for m in pii.find_pii(t)}
                       | {m.kind for name in names for m in pii.find_pii(name)})
        if kinds:
            decisions["pii"] = {"action": "blocked", "kinds": kinds}
            raise _blocked(f"The request contains personal data ({', '.join(kinds)}) and this team's policy "
                           f"blocks it; remove it or ask an admin for pii=redact.", decisions)
        return texts
    _refuse_personal_names(names, decisions)
    counts: dict[str, int] = {}
    redacted = []
    for container, key, text in texts:
        new, found = pii.redact(text)
        if new != text:
            container[key] = new
            for k, n in found.items():
                if n:
                    counts[k] = counts.get(k, 0) + n
        redacted.append((container, key, new))
    if counts:
        decisions["pii"] = {"action": "redacted", "counts": counts}
    return redacted


def apply_policy(policy: TeamPolicy, body: dict, kind: str) -> PolicyOutcome:
    """Apply `policy` to `body` (chat, completions, embeddings or responses) in place; raises 400
    content_policy_violation, or 400 invalid_request where pii=redact meets personal data it cannot rewrite (a tool
    schema's property name)."""
    decisions: dict[str, Any] = {}
    field_ = "input" if kind == "embeddings" else "prompt"
    if kind == "embeddings":
        max_tokens = None
        texts = _completion_texts(body, field_)
    elif kind == "responses":
        max_tokens = _cap_max_tokens(body, policy.max_tokens, decisions, ("max_output_tokens",))
        texts = responses_api.texts(body)
    else:
        max_tokens = _cap_max_tokens(body, policy.max_tokens, decisions)
        texts = _chat_texts(body) if kind == "chat" else _completion_texts(body)
    names: dict[str, str] = {}
    if kind in ("chat", "responses") and ("tools" in body or "functions" in body):
        tool_texts, names = _tool_texts(body, kind)
        texts += tool_texts
    if kind != "embeddings" and any(k in body for k in _FORMAT_KEYS):
        _format_texts(body, kind, texts, names)
    token_ids = 0 if kind in ("chat", "responses") else _token_ids(body, field_)
    if token_ids and (policy.pii != "off" or policy.injection == "block"):
        # The gateway has no tokenizer: ids cannot be checked for personal data or injection, so they cannot pass.
        raise invalid_request(f"This team's policy reads prompts (pii={policy.pii}, injection={policy.injection}), "
                              f"so `{field_}` must be text, not token ids.", param=field_)

    if policy.pii != "off" and (texts or names):
        try:
            texts = _apply_pii(policy.pii, texts, names, decisions)
        except pii.PiiRuleTimeout as exc:  # unchecked text never goes on
            log.error("PII rule ran past its time budget; request refused", extra={"error": str(exc)})
            decisions["pii"] = {"action": "failed", "rule": exc.kind}
            err = pii_rule_timeout(exc.kind)
            err.decisions = decisions  # type: ignore[attr-defined]  # so the audit record says why
            raise err from None

    prompt_text = "\n".join(t for _, _, t in texts)
    if policy.injection != "off":
        hits = detect_injection(prompt_text)
        if hits:
            decisions["injection"] = {"flagged": True, "heuristics": hits,
                                      "action": "blocked" if policy.injection == "block" else "flagged"}
            if policy.injection == "block":
                raise _blocked("The request looks like a prompt-injection attempt and this team's policy "
                               "blocks it.", decisions)
    return PolicyOutcome(prompt_text=prompt_text, max_tokens=max_tokens, decisions=decisions, token_ids=token_ids)
