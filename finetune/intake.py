"""Intake: read a data file in any supported format into OpenAI chat rows, each with its source line number.

OpenAI chat JSONL (`{"messages": [...]}` per line) is canonical. ShareGPT (`conversations` with `from`/`value`),
Alpaca (`instruction`/`input`/`output`, optional `system` and `history`) and CSV are converted; JSON arrays and JSONL
are both read. Conversion does not judge: a record it cannot fully convert is passed on as far as it goes, so
`validate` reports every problem with the same codes whatever the source format.

Line numbers: JSONL and CSV report the physical line where the record starts (a multi-turn CSV conversation: its
first row); a JSON array reports the line where each element starts, and each row also carries its record index,
because a compact array (`json.dump` of a list) puts every record on line 1. Messages then say `record 3 (line 1)`.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from finetune.problems import Problem

Format = Literal["auto", "openai", "sharegpt", "alpaca", "csv"]
FORMATS: tuple[str, ...] = ("openai", "sharegpt", "alpaca", "csv")

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}
CSV_DEFAULT_COLUMNS = {"conversation_id": "conversation_id", "role": "role", "content": "content"}


def where(line: int, record: int | None) -> str:
    """How a message names a record: `line 7`, or `record 3 (line 1)` for an element of a JSON array."""
    return f"line {line}" if record is None else f"record {record} (line {line})"


@dataclass
class Row:
    line: int
    data: Any  # {"messages": [...]} when the record converted; otherwise what was parsed, for validate to judge
    record: int | None = None  # 1-based index in a JSON array, where many records can share a line

    @property
    def key(self) -> tuple[int, int]:
        """Unique within one file, unlike the line: what dedup, token stats and the split tell rows apart by."""
        return (self.line, self.record or 0)

    @property
    def where(self) -> str:
        return where(self.line, self.record)


@dataclass
class Intake:
    format: str
    rows: list[Row] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)  # records that could not even be parsed
    fatal: bool = False  # the file cannot be read as a whole (records were lost): no policy may train on it


def detect_format(path: Path, text: str) -> str:
    """Guess from the extension and the first record's keys."""
    if path.suffix.lower() in (".csv", ".tsv"):
        return "csv"
    first: Any = None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            first, _ = json.JSONDecoder().raw_decode(stripped[1:].lstrip())
        except json.JSONDecodeError:
            first = None
    else:
        for line in text.splitlines():
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    continue
                break
    if isinstance(first, dict):
        if "conversations" in first:
            return "sharegpt"
        if "instruction" in first and "messages" not in first:
            return "alpaca"
    return "openai"


def read_file(path: Path, fmt: Format = "auto", columns: dict[str, str] | None = None) -> Intake:
    """Parse and convert `path`; parse failures become problems, never exceptions."""
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):  # a BOM from spreadsheet exports
        raw = raw[3:]
    text, bad_lines = _decode(raw)
    chosen = detect_format(path, text) if fmt == "auto" else fmt
    array = chosen != "csv" and text.lstrip().startswith("[")
    if bad_lines and (chosen == "csv" or array):
        # The bad lines were blanked; in a CSV or an array that moves record boundaries (a quoted cell, a turn of a
        # conversation, an element), so no record near them can be trusted: refuse the file, not just the line.
        intake = Intake(chosen, fatal=True, problems=[
            Problem(line=i, code="invalid_encoding", message="the line is not valid UTF-8; a CSV file or JSON array "
                                                             "is only read whole, so nothing was read")
            for i in sorted(bad_lines)])
    elif chosen == "csv":
        intake = _read_csv(text, columns or {})
    else:
        convert = {"openai": _openai, "sharegpt": _sharegpt, "alpaca": _alpaca}[chosen]
        intake = Intake(chosen)
        records = _json_array(text, intake) if array else _jsonl(text, intake, bad_lines)
        intake.rows = [Row(line, convert(obj) if isinstance(obj, dict) else obj, i if array else None)
                       for i, (line, obj) in enumerate(records, start=1)]
    intake.format = chosen
    if not intake.rows and not intake.problems:
        intake.problems.append(Problem(line=0, code="empty_file", message="the file holds no records"))
    return intake


def _decode(raw: bytes) -> tuple[str, set[int]]:
    """UTF-8 text, with undecodable lines replaced (and their numbers kept) so one bad line fails only itself."""
    try:
        return raw.decode("utf-8"), set()
    except UnicodeDecodeError:
        lines, bad = [], set()
        for i, line in enumerate(raw.split(b"\n"), start=1):
            try:
                lines.append(line.decode("utf-8"))
            except UnicodeDecodeError:
                lines.append("")
                bad.add(i)
        return "\n".join(lines), bad


def _jsonl(text: str, intake: Intake, bad_lines: set[int]) -> list[tuple[int, Any]]:
    records = []
    for i, line in enumerate(text.split("\n"), start=1):
        if i in bad_lines:
            intake.problems.append(Problem(line=i, code="invalid_encoding", message="the line is not valid UTF-8"))
            continue
        if not line.strip():
            continue  # blank lines (a trailing newline, hand-edited files) carry no record
        try:
            records.append((i, json.loads(line)))
        except json.JSONDecodeError as exc:
            intake.problems.append(Problem(line=i, code="invalid_json",
                                           message=f"not valid JSON: {exc.msg} at column {exc.colno}"))
    return records


def _json_array(text: str, intake: Intake) -> list[tuple[int, Any]]:
    """Elements of a top-level JSON array with the line each starts on; stops at the first syntax error.

    Anything after the closing `]` is an error too: a file whose first line is an array and whose next lines are
    JSONL would otherwise lose those lines without a word.
    """
    decoder = json.JSONDecoder()
    records = []
    pos = text.index("[") + 1
    n = len(text)
    while True:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n or text[pos] == "]":
            if pos >= n:
                intake.problems.append(Problem(line=text.count("\n", 0, n) + 1, code="invalid_json",
                                               message="the JSON array is not closed"))
                intake.fatal = True
            elif text[pos + 1:].strip():
                after = pos + 1 + len(text[pos + 1:]) - len(text[pos + 1:].lstrip())
                intake.problems.append(Problem(line=text.count("\n", 0, after) + 1, code="invalid_json",
                                               message="data after the end of the JSON array; a file holds one "
                                                       "array, or one JSON object per line (JSONL), not both"))
                intake.fatal = True
            return records
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            intake.problems.append(Problem(line=exc.lineno, code="invalid_json",
                                           message=f"record {len(records) + 1}: not valid JSON: {exc.msg} at column "
                                                   f"{exc.colno}; records after this point could not be read"))
            intake.fatal = True
            return records
        records.append((line, obj))


def _openai(obj: dict[str, Any]) -> dict[str, Any]:
    return obj


def _sharegpt(obj: dict[str, Any]) -> dict[str, Any]:
    turns = obj.get("conversations")
    if not isinstance(turns, list):
        return {k: v for k, v in obj.items() if k != "conversations"}  # -> missing_messages_list
    messages: list[Any] = []
    if isinstance(obj.get("system"), str) and obj["system"]:
        messages.append({"role": "system", "content": obj["system"]})
    for turn in turns:
        if not isinstance(turn, dict):
            messages.append(turn)
            continue
        speaker = turn.get("from")
        msg: dict[str, Any] = {"role": SHAREGPT_ROLES.get(speaker, speaker) if isinstance(speaker, str) else speaker}
        if "value" in turn:
            msg["content"] = turn["value"]
        if msg["role"] is None:
            del msg["role"]
        messages.append(msg)
    return {"messages": messages}


def _alpaca(obj: dict[str, Any]) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    if isinstance(obj.get("system"), str) and obj["system"]:
        messages.append({"role": "system", "content": obj["system"]})
    history = obj.get("history") or []
    for pair in history if isinstance(history, list) else [history]:
        if isinstance(pair, (list, tuple)) and len(pair) == 2:
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        else:
            messages.append(pair)  # not a [question, answer] pair: passed on as is, so validate flags the record
    instruction = obj.get("instruction")
    extra = obj.get("input")
    if isinstance(instruction, str) and isinstance(extra, str) and extra.strip():
        instruction = f"{instruction}\n\n{extra}"
    messages.append({"role": "user", "content": instruction} if instruction is not None else {"role": "user"})
    if "output" in obj:
        messages.append({"role": "assistant", "content": obj["output"]})
    return {"messages": messages}


def _read_csv(text: str, columns: dict[str, str]) -> Intake:
    """Two shapes: one turn per row (conversation_id, role, content), or one exchange per row (user, assistant).

    `columns` maps our names to the file's headers, e.g. {"user": "question", "assistant": "answer"}.
    """
    intake = Intake("csv")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return intake
    index = {name.strip(): i for i, name in enumerate(header)}
    pairs = "user" in columns or "assistant" in columns or ({"user", "assistant"} <= index.keys()
                                                             and "role" not in index)
    wanted = ({"user": "user", "assistant": "assistant", "system": "system"} if pairs else dict(CSV_DEFAULT_COLUMNS))
    wanted.update(columns)
    required = ("user", "assistant") if pairs else ("conversation_id", "role", "content")
    missing = [f"{key} -> {wanted[key]!r}" for key in required if wanted[key] not in index]
    if missing:
        # Never quote the header: in a file without one, the "header" is the first record and may hold personal data.
        intake.problems.append(Problem(line=1, code="csv_missing_columns",
                                       message=f"the first line has {len(header)} column(s), none for "
                                               f"{', '.join(missing)}; expected a header row naming "
                                               f"{', '.join(wanted[key] for key in required)}; map columns in the "
                                               "config's `columns`"))
        return intake
    col = {key: index.get(name) for key, name in wanted.items()}

    def cell(row: list[str], key: str) -> str | None:
        i = col.get(key)
        return row[i] if i is not None and i < len(row) else None

    groups: dict[str, Row] = {}
    line = 1
    while True:
        line = reader.line_num + 1  # where the next record starts
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            intake.problems.append(Problem(line=line, code="invalid_csv", message=f"CSV parse error: {exc}"))
            intake.fatal = True
            break
        if not any(c.strip() for c in row):
            continue
        if pairs:
            messages = []
            if cell(row, "system"):
                messages.append({"role": "system", "content": cell(row, "system")})
            messages.append({"role": "user", "content": cell(row, "user") or ""})
            messages.append({"role": "assistant", "content": cell(row, "assistant") or ""})
            intake.rows.append(Row(line, {"messages": messages}))
            continue
        conv_id = cell(row, "conversation_id") or f"<line {line}>"
        if conv_id not in groups:
            groups[conv_id] = Row(line, {"messages": []})
            intake.rows.append(groups[conv_id])
        groups[conv_id].data["messages"].append({"role": cell(row, "role") or "", "content": cell(row, "content") or ""})
    return intake
