"""A team's policy applied to one request body: max_tokens cap, PII off/redact/block, prompt-injection flag/block.

Works on the parsed JSON dict in place (no pydantic per request). Returns what it decided, for the audit record and
the logs; the decisions never contain the text itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway import responses_api
from gateway.directory import TeamPolicy
from gateway.errors import content_policy, invalid_request
from gateway.injection import detect_injection


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


def apply_policy(policy: TeamPolicy, body: dict, kind: str) -> PolicyOutcome:
    """Apply `policy` to `body` (chat, completions, embeddings or responses) in place; raises 400
    content_policy_violation."""
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
    token_ids = 0 if kind in ("chat", "responses") else _token_ids(body, field_)
    if token_ids and (policy.pii != "off" or policy.injection == "block"):
        # The gateway has no tokenizer: ids cannot be checked for personal data or injection, so they cannot pass.
        raise invalid_request(f"This team's policy reads prompts (pii={policy.pii}, injection={policy.injection}), "
                              f"so `{field_}` must be text, not token ids.", param=field_)

    if policy.pii != "off" and texts:
        from sovereign import pii

        if policy.pii == "block":
            kinds = sorted({m.kind for _, _, t in texts for m in pii.find_pii(t)})
            if kinds:
                decisions["pii"] = {"action": "blocked", "kinds": kinds}
                raise _blocked(f"The request contains personal data ({', '.join(kinds)}) and this team's policy "
                               f"blocks it; remove it or ask an admin for pii=redact.", decisions)
        else:
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
            texts = redacted
            if counts:
                decisions["pii"] = {"action": "redacted", "counts": counts}

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
