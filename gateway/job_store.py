"""Fine-tune jobs on disk as the jobs API shows them: `<SOVEREIGN_HOME>/jobs/<job_id>/job.json`
(sovereign.formats.JobRecord), `events.jsonl` and `checkpoints/<step>/metrics.json`, turned into OpenAI's
`fine_tuning.job`, `fine_tuning.job.event` and `fine_tuning.job.checkpoint` objects.

The gateway writes the record at creation and on cancel; the worker (`sovereign finetune run-job`) writes it while
running. Both write whole files atomically and append whole event lines, so either side may read at any time.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from sovereign.formats import JOB_RECORD, JobRecord

EVENTS = "events.jsonl"
CHECKPOINTS = "checkpoints"
TERMINAL = ("succeeded", "failed", "cancelled")
HYPERPARAMETERS = ("batch_size", "learning_rate_multiplier", "n_epochs")


def new_job_id() -> str:
    # Lower-case hex only: the id names a Kubernetes Job (sovereign-ft-<id>) as well.
    return f"ftjob-{secrets.token_hex(12)}"


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def job_object(record: JobRecord) -> dict[str, Any]:
    """The OpenAI `fine_tuning.job` object for a record."""
    extra = record.model_extra or {}
    hp = {k: record.hyperparameters.get(k, "auto") for k in HYPERPARAMETERS}
    error = record.error
    if error is not None:
        error = {"code": str(error.get("code") or "error"), "message": str(error.get("message") or ""),
                 "param": error.get("param")}
    return {"id": record.id, "object": "fine_tuning.job", "created_at": _ts(record.created_at),
            "error": error, "fine_tuned_model": record.fine_tuned_model, "finished_at": _ts(record.finished_at),
            "hyperparameters": hp, "model": record.model, "organization_id": f"org-{record.owner or 'local'}",
            "result_files": [], "seed": record.seed if record.seed is not None else 0, "status": record.status,
            "trained_tokens": record.trained_tokens, "training_file": record.training_file,
            "validation_file": record.validation_file, "estimated_finish": None, "integrations": [],
            "metadata": extra.get("metadata"), "user_provided_suffix": record.suffix,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}


def event_object(raw: dict[str, Any], fallback_id: str) -> dict[str, Any]:
    level = raw.get("level")
    kind = raw.get("type")
    return {"object": "fine_tuning.job.event", "id": str(raw.get("id") or fallback_id),
            "created_at": int(raw.get("created_at") or 0),
            "level": level if level in ("info", "warn", "error") else ("warn" if level == "warning" else "info"),
            "message": str(raw.get("message") or ""), "type": kind if kind in ("message", "metrics") else "message",
            "data": raw.get("data")}


class JobStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def read(self, job_id: str) -> JobRecord | None:
        if not job_id.startswith("ftjob-") or "/" in job_id or "." in job_id:
            return None
        try:
            return JobRecord.read(self.root / job_id / JOB_RECORD)
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None

    def write(self, record: JobRecord) -> None:
        record.write(self.root / record.id / JOB_RECORD)

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [e.name for e in os.scandir(self.root) if e.name.startswith("ftjob-") and e.is_dir()]

    def owned(self, owner: str) -> list[JobRecord]:
        """The team's jobs, newest first."""
        records = [r for r in (self.read(i) for i in self.ids()) if r is not None and r.owner == owner]
        records.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        return records

    # events ----------------------------------------------------------------------------------------------------
    def append_event(self, job_id: str, message: str, *, level: str = "info", data: dict | None = None) -> None:
        line = json.dumps({"id": f"ftevent-{secrets.token_hex(12)}", "created_at": int(time.time()), "level": level,
                           "message": message, "type": "message", "data": data or {}}, ensure_ascii=False)
        with open(self.root / job_id / EVENTS, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """Events newest first. A line still being written (no newline yet) is left for the next read."""
        try:
            data = (self.root / job_id / EVENTS).read_bytes()
        except FileNotFoundError:
            return []
        out = []
        # Bytes, decoded line by line: a long line is appended in several writes, so the file may end inside a
        # multi-byte character, and that unfinished line is not an event yet.
        for n, line in enumerate(data.split(b"\n")[:-1], start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line.decode("utf-8"))
            except ValueError:  # not UTF-8 (UnicodeDecodeError) or not JSON: not an event
                continue
            if isinstance(raw, dict):
                out.append(event_object(raw, f"ftevent-{job_id.removeprefix('ftjob-')}-{n}"))
        out.reverse()
        return out

    # checkpoints -----------------------------------------------------------------------------------------------
    def checkpoints(self, record: JobRecord) -> list[dict[str, Any]]:
        """Complete checkpoints (a numbered folder with metrics.json), newest step first."""
        root = self.root / record.id / CHECKPOINTS
        if not root.is_dir():
            return []
        out = []
        for entry in os.scandir(root):
            if not entry.name.isdigit():
                continue
            path = Path(entry.path) / "metrics.json"
            try:
                metrics = json.loads(path.read_text(encoding="utf-8"))
                created = int(path.stat().st_mtime)
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            step = int(entry.name)
            shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}
            shown["step"] = step
            name = record.fine_tuned_model or record.id
            out.append({"object": "fine_tuning.job.checkpoint",
                        "id": f"ftckpt-{record.id.removeprefix('ftjob-')}-{step}", "created_at": created,
                        "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{step}", "fine_tuning_job_id": record.id,
                        "metrics": shown, "step_number": step})
        out.sort(key=lambda c: c["step_number"], reverse=True)
        return out
