"""Uploaded files (`/v1/files`) on disk: `<SOVEREIGN_HOME>/files/<file-id>/data.jsonl` and its `file.json` sidecar.

A file appears all at once: it is written and checked in a hidden temp folder that is renamed into place, so a
listing or a fine-tune worker never sees half an upload. Fine-tune workers find the data by id
(`finetune.jobs.resolve_file` looks for `<files>/<id>/data.jsonl`). Every file belongs to the team that uploaded it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from gateway import errors as E

DATA = "data.jsonl"
SIDECAR = "file.json"
PURPOSES = ("fine-tune",)
_CHUNK = 1 << 20
# What new_file_id makes, and room for more: anything else (a NUL, a path, a name too long for the file system) is
# as unknown as a missing id instead of an OSError or ValueError from the path.
_FILE_ID = re.compile(r"file-[A-Za-z0-9_-]{1,128}")
TMP_PREFIX, DELETED_PREFIX = ".tmp-", ".deleted-"
# Replicas may share the folder: a temp item this young may be another replica's upload still being written.
SWEEP_AFTER_S = 3600.0

log = logging.getLogger("sovereign.gateway.files")


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def file_object(meta: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI `file` object for a sidecar."""
    return {"id": meta["id"], "object": "file", "bytes": meta["bytes"], "created_at": meta["created_at"],
            "filename": meta["filename"], "purpose": meta["purpose"], "status": "processed",
            "status_details": None, "expires_at": None}


class JsonlChecker:
    """Checks a byte stream line by line: UTF-8, one JSON object per non-empty line; collects the first problems."""

    def __init__(self, max_problems: int = 5) -> None:
        self.line = 0
        self.rows = 0
        self.problems: list[str] = []
        self.max_problems = max_problems
        self._rest = b""

    def feed(self, chunk: bytes) -> None:
        data = self._rest + chunk
        *lines, self._rest = data.split(b"\n")
        for raw in lines:
            self._check(raw)

    def close(self) -> None:
        if self._rest:
            self._check(self._rest)
            self._rest = b""

    def _check(self, raw: bytes) -> None:
        self.line += 1
        if len(self.problems) >= self.max_problems:
            return
        if not raw.strip():
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.problems.append(f"line {self.line}: not UTF-8 ({exc.reason} at byte {exc.start})")
            return
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            self.problems.append(f"line {self.line}: not valid JSON ({exc.msg} at column {exc.colno})")
            return
        except RecursionError:
            self.problems.append(f"line {self.line}: JSON nested too deeply to read")
            return
        if not isinstance(obj, dict):
            self.problems.append(f"line {self.line}: expected a JSON object, got {type(obj).__name__}")
            return
        self.rows += 1


class FileStore:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    # writing ---------------------------------------------------------------------------------------------------
    def create(self, source: BinaryIO, *, filename: str, purpose: str, owner: str) -> dict[str, Any]:
        """Copy `source` in, checking size and JSONL as it streams; returns the sidecar. Raises 400/413."""
        if purpose not in PURPOSES:
            raise E.invalid_request(f"purpose {purpose!r} is not supported here; upload fine-tuning data with "
                                    f"purpose 'fine-tune'.", param="purpose", code="invalid_purpose")
        self.root.mkdir(parents=True, exist_ok=True)
        file_id = new_file_id()
        tmp = self.root / f"{TMP_PREFIX}{file_id}"
        tmp.mkdir()
        try:
            digest, size, checker = hashlib.sha256(), 0, JsonlChecker()
            with open(tmp / DATA, "wb") as out:
                while chunk := source.read(_CHUNK):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise E.GatewayError(413, f"The file is larger than the limit of {self.max_bytes} bytes "
                                                  f"for uploads; split it or ask an admin to raise "
                                                  f"fine_tuning.max_file_bytes.", code="file_too_large",
                                             param="file")
                    digest.update(chunk)
                    checker.feed(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            checker.close()
            if checker.problems:
                raise E.invalid_request(f"{filename} is not valid JSONL (one JSON object per line): "
                                        + "; ".join(checker.problems), param="file", code="invalid_file_format")
            if checker.rows == 0:
                raise E.invalid_request(f"{filename} holds no JSON lines; a fine-tuning file needs one example "
                                        f"per line.", param="file", code="invalid_file_format")
            now_ns = time.time_ns()  # created_at is whole seconds (OpenAI's shape); the ns break ties when listing
            meta = {"id": file_id, "bytes": size, "created_at": now_ns // 10**9, "created_ns": now_ns,
                    "filename": filename, "purpose": purpose, "owner": owner, "sha256": digest.hexdigest(),
                    "rows": checker.rows}
            with open(tmp / SIDECAR, "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2, ensure_ascii=False)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, self.root / file_id)
            return meta
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def delete(self, file_id: str, owner: str) -> None:
        self.get(file_id, owner)
        # Rename first so the id disappears in one step, then remove the bytes.
        gone = self.root / f"{DELETED_PREFIX}{file_id}-{secrets.token_hex(4)}"
        os.rename(self.root / file_id, gone)
        shutil.rmtree(gone, ignore_errors=True)

    def sweep(self) -> list[str]:
        """Remove what a process killed mid-upload or mid-delete left; returns the names removed. A `.deleted-*`
        folder is gone for every reader already; a `.tmp-*` one only once untouched for SWEEP_AFTER_S, as a younger
        one may be another replica's upload."""
        if not self.root.is_dir():
            return []
        now, removed = time.time(), []
        for entry in os.scandir(self.root):
            changed = _last_change(entry.path) if entry.name.startswith(TMP_PREFIX) else None
            if entry.name.startswith(DELETED_PREFIX) or (changed is not None and now - changed > SWEEP_AFTER_S):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.name)
        if removed:
            log.info("removed leftovers of interrupted uploads and deletes", extra={"names": removed})
        return removed

    # reading ---------------------------------------------------------------------------------------------------
    def _read(self, file_id: str) -> dict[str, Any] | None:
        if not _FILE_ID.fullmatch(file_id):
            return None
        try:
            return json.loads((self.root / file_id / SIDECAR).read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None

    def get(self, file_id: str, owner: str, *, param: str = "file_id") -> dict[str, Any]:
        """The sidecar of a file `owner` may see; another team's file is as unknown as a missing one (404)."""
        meta = self._read(file_id)
        if meta is None or meta.get("owner") != owner:
            raise E.GatewayError(404, f"No such File object: {file_id}", code="file_not_found", param=param)
        return meta

    def data_path(self, file_id: str) -> Path:
        return self.root / file_id / DATA

    def iter_owned(self, owner: str) -> Iterator[dict[str, Any]]:
        if not self.root.is_dir():
            return
        for entry in os.scandir(self.root):
            if entry.name.startswith("file-"):
                meta = self._read(entry.name)
                if meta is not None and meta.get("owner") == owner:
                    yield meta


def _last_change(folder: str) -> float | None:
    """The newest mtime of a folder and what it holds (its mtime stays put while an upload's data grows)."""
    try:
        with os.scandir(folder) as entries:
            return max([os.stat(folder).st_mtime, *(e.stat().st_mtime for e in entries)])
    except OSError:  # gone meanwhile: renamed into place, or removed by another replica
        return None


def paginate(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """OpenAI's cursor page over `items` (already in order): what follows the item `after`, at most `limit`."""
    start = 0
    if after:
        ids = [i["id"] for i in items]
        start = ids.index(after) + 1 if after in ids else len(items)
    page = items[start:start + limit]
    return {"object": "list", "data": page, "has_more": start + limit < len(items),
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}
