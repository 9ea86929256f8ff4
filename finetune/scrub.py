"""PII scrubbing: every message's text goes through `sovereign.pii.redact` (typed placeholders such as [PHONE]), and
so do the string values of tool calls' arguments (kept valid JSON) and of the tools' descriptions and schemas.

The report holds counts per kind and the line numbers of rows that changed, never the values, nor hashes of them:
an unsalted hash of an 11-digit phone number is reversed by trying all numbers. After scrubbing each message is
scanned again; anything still found (a bug, since redaction is idempotent) fails the run rather than leak.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from finetune.errors import FinetuneError
from finetune.intake import Row
from sovereign.pii import PiiRuleTimeout, contains_pii, kinds, redact


class ScrubReport(BaseModel):
    enabled: bool = True
    counts: dict[str, int] = Field(default_factory=lambda: dict.fromkeys(kinds(), 0))  # placeholders inserted, by kind
    rows_changed: int = 0
    messages_changed: int = 0
    changed_lines: list[int] = Field(default_factory=list)


def scrub_text(text: str, report: ScrubReport) -> str:
    clean, counts = redact(text)
    for kind, n in counts.items():
        report.counts[kind] = report.counts.get(kind, 0) + n
    return clean


def _scrub_value(value: Any, report: ScrubReport, skip: frozenset[str] = frozenset()) -> Any:
    """Every string in a JSON value redacted; object keys, and the values of the keys in `skip`, kept."""
    if isinstance(value, str):
        return scrub_text(value, report)
    if isinstance(value, int) and not isinstance(value, bool):  # a phone or card number written as a JSON number
        text = str(value)
        clean = scrub_text(text, report)
        return value if clean == text else clean
    if isinstance(value, list):
        return [_scrub_value(v, report, skip) for v in value]
    if isinstance(value, dict):
        return {k: v if k in skip else _scrub_value(v, report, skip) for k, v in value.items()}
    return value


# A schema's structure: property names listed in `required`, JSON types. Redacting them would break the schema.
_SCHEMA_WORDS = frozenset({"type", "required"})


def _scrub_calls(calls: list[Any], report: ScrubReport) -> list[Any]:
    """Each call's arguments (a JSON object in a string) with their string values redacted, still valid JSON."""
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
            out.append(call)
            continue
        arguments = json.dumps(_scrub_value(json.loads(fn["arguments"]), report), ensure_ascii=False)
        out.append({**call, "function": {**fn, "arguments": arguments}})
    return out


def scrub_tools(tools: list[Any], report: ScrubReport) -> list[Any]:
    """Descriptions and schema strings (enums, defaults, examples) redacted; names and the schema's shape kept."""
    return [{**t, "function": {**t["function"], **{k: _scrub_value(t["function"][k], report, _SCHEMA_WORDS)
                                                  for k in ("description", "parameters") if k in t["function"]}}}
            for t in tools]


def _scrub_message(msg: dict[str, Any], report: ScrubReport) -> tuple[dict[str, Any], bool]:
    out = dict(msg)
    changed = False
    if isinstance(out.get("tool_calls"), list):
        new_calls = _scrub_calls(out["tool_calls"], report)
        changed |= new_calls != out["tool_calls"]
        out["tool_calls"] = new_calls
    for key in ("content", "name"):
        value = out.get(key)
        if isinstance(value, str):
            new = scrub_text(value, report)
        elif isinstance(value, list):  # text content parts
            new = [{**p, "text": scrub_text(p["text"], report)} if isinstance(p, dict) and isinstance(
                p.get("text"), str) else p for p in value]
        else:
            continue
        changed |= new != value
        out[key] = new
    return out, changed


def scrub_rows(rows: list[Row], progress: Callable[[], None] | None = None) -> tuple[list[Row], ScrubReport]:
    """New rows with PII replaced; the input rows are left untouched."""
    report = ScrubReport()
    out = []
    for row in rows:
        try:
            out.append(_scrub_row(row, report))
        except PiiRuleTimeout as exc:
            raise FinetuneError(f"line {row.line}: {exc}", code=exc.code) from None
        if progress is not None:
            progress()
    return out, report


def _scrub_row(row: Row, report: ScrubReport) -> Row:
    messages = []
    row_changed = False
    for msg in row.data["messages"]:
        new, changed = _scrub_message(msg, report)
        messages.append(new)
        if changed:
            report.messages_changed += 1
            row_changed = True
    data = {**row.data, "messages": messages}
    if row.data.get("tools"):
        data["tools"] = scrub_tools(row.data["tools"], report)
        if data["tools"] != row.data["tools"]:
            row_changed = True
    for msg in messages:
        if any(contains_pii(text) for text in _texts(msg)):
            raise FinetuneError(f"line {row.line}: personal data is still found after scrubbing; refusing to "
                                "write it (report this as a bug in sovereign.pii)", code="scrub_failed")
    if row_changed:
        report.rows_changed += 1
        report.changed_lines.append(row.line)
    return Row(row.line, data)


def _texts(msg: dict[str, Any]) -> list[str]:
    content = msg.get("content")
    parts = [p.get("text", "") for p in content if isinstance(p, dict)] if isinstance(content, list) else [content]
    calls = [c["function"].get("arguments") for c in msg.get("tool_calls") or ()
             if isinstance(c, dict) and isinstance(c.get("function"), dict)]
    return [t for t in (*parts, msg.get("name"), *calls) if isinstance(t, str)]
