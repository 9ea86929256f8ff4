"""PII scrubbing: every message's text goes through `sovereign.pii.redact` (typed placeholders such as [PHONE]).

The report holds counts per kind and the line numbers of rows that changed, never the values, nor hashes of them:
an unsalted hash of an 11-digit phone number is reversed by trying all numbers. After scrubbing each message is
scanned again; anything still found (a bug, since redaction is idempotent) fails the run rather than leak.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from finetune.errors import FinetuneError
from finetune.intake import Row
from sovereign.pii import contains_pii, kinds, redact


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


def _scrub_message(msg: dict[str, Any], report: ScrubReport) -> tuple[dict[str, Any], bool]:
    out = dict(msg)
    changed = False
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
        messages = []
        row_changed = False
        for msg in row.data["messages"]:
            new, changed = _scrub_message(msg, report)
            messages.append(new)
            if changed:
                report.messages_changed += 1
                row_changed = True
        for msg in messages:
            if any(contains_pii(text) for text in _texts(msg)):
                raise FinetuneError(f"line {row.line}: personal data is still found after scrubbing; refusing to "
                                    "write it (report this as a bug in sovereign.pii)", code="scrub_failed")
        if row_changed:
            report.rows_changed += 1
            report.changed_lines.append(row.line)
        out.append(Row(row.line, {**row.data, "messages": messages}))
        if progress is not None:
            progress()
    return out, report


def _texts(msg: dict[str, Any]) -> list[str]:
    content = msg.get("content")
    parts = [p.get("text", "") for p in content if isinstance(p, dict)] if isinstance(content, list) else [content]
    return [t for t in (*parts, msg.get("name")) if isinstance(t, str)]
