"""`sovereign finetune prepare`: a raw export in, DIR/train.jsonl + DIR/val.jsonl + DIR/prepare_report.json out.

    sovereign finetune prepare export.jsonl --model SmolLM2-135M-Instruct --out prepared/

Stages, each counted in the report: read (any supported format) -> structure checks -> PII scrub -> token checks
with the model's own chat template (after scrubbing, on the text that will train) -> exact and near dedup ->
split by conversation -> overlap check. With `on_invalid: fail` (the default) any problem refuses the whole file and
only the report is written; with `drop` each bad row is left out and listed. The output folder is built beside DIR
and renamed into place: a reader sees the old folder or the whole new one. Nothing written here holds raw personal
data when scrubbing is on (the report has counts and line numbers, never values).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from finetune.dedup import DedupReport, dedup, normalize, overlaps
from finetune.errors import FinetuneError
from finetune.intake import Format, Intake, Row, read_file, where
from finetune.problems import DataInvalid, Problem, count_by_code, summarize
from finetune.scrub import ScrubReport, scrub_rows
from finetune.validate import TokenCheck, TokenStats, load_encoder, validate_structure, validate_tokens
from sovereign.errors import ConfigError
from sovereign.formats import MODEL_MANIFEST, ModelManifest, sha256_file, write_json_atomic
from sovereign.pii import redact
from sovereign.pii_rules import PiiRules
from sovereign.pii_rules import install as install_pii_rules

TRAIN_FILE = "train.jsonl"
VAL_FILE = "val.jsonl"
REPORT_FILE = "prepare_report.json"
OUTPUTS = (TRAIN_FILE, VAL_FILE, REPORT_FILE)


class PrepareOptions(BaseModel):
    """What `prepare` does; the same fields as FinetuneConfig.data, plus max_seq_len from its training section."""

    format: Format = "auto"
    columns: dict[str, str] = Field(default_factory=dict)
    max_seq_len: int = Field(1024, ge=16)
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    on_invalid: Literal["fail", "drop"] = "fail"
    scrub_pii: bool = True
    refuse_pii: bool = False
    dedup: bool = True
    near_duplicate_threshold: float = Field(0.85, gt=0, le=1)
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> PrepareOptions:
        """From a FinetuneConfig: its `data` section and `training.max_seq_len`."""
        data = cfg.data.model_dump(exclude={"train_file", "validation_file", "prepared_dir"})
        fields = {k: v for k, v in data.items() if k in cls.model_fields}
        return cls(**{**fields, "max_seq_len": cfg.training.max_seq_len, **overrides})


class InputFile(BaseModel):
    role: Literal["train", "validation"]
    name: str
    sha256: str
    bytes: int
    format: str
    records: int


class OutputFile(BaseModel):
    rows: int
    sha256: str
    bytes: int
    tokens: int
    trainable_tokens: int


class PrepareReport(BaseModel):
    schema_version: int = 1
    status: Literal["succeeded", "failed"] = "succeeded"
    error: dict[str, Any] | None = None  # {"code", "message"} when failed
    model: str
    model_manifest_sha256: str
    chat_template_sha256: str | None = None
    options: PrepareOptions
    inputs: list[InputFile] = Field(default_factory=list)
    stages: dict[str, int] = Field(default_factory=dict)  # rows left after each stage, in order
    problems: list[Problem] = Field(default_factory=list)
    problems_by_code: dict[str, int] = Field(default_factory=dict)
    dropped: list[dict[str, Any]] = Field(default_factory=list)  # {"file", "line", "codes"} under on_invalid: drop
    scrub: ScrubReport | None = None
    pii_rules: PiiRules | None = None  # the organisation's own kinds the scrub found too (file, sha256, kinds)
    dedup: DedupReport | None = None
    split: dict[str, Any] = Field(default_factory=dict)
    outputs: dict[str, OutputFile] = Field(default_factory=dict)


class Hooks:
    """Progress callbacks; the CLI passes rich progress bars, library callers get silence."""

    def stage(self, name: str, total: int | None = None) -> Callable[[], None] | None:
        return None


def resolve_model(model: str, models_dir: Path) -> tuple[Path, ModelManifest]:
    folder = models_dir / model
    try:
        return folder, ModelManifest.read(folder / MODEL_MANIFEST)
    except FileNotFoundError:
        raise FinetuneError(f"model {model!r} is not in the model store ({models_dir}); import it with "
                            "`sovereign models import`", code="model_not_found") from None


def split_key(row: Row, seed: int) -> str:
    """Rows that open the same way (same first user turn and answer) share a key, so a conversation exported
    once per turn, or a longer version of it, lands in one split only."""
    opening = [m for m in row.data["messages"] if m.get("role") != "system"][:2]
    basis = "\x1e".join(normalize(str(m.get("content", ""))) for m in opening)
    return hashlib.sha256(f"{seed}\x1f{basis}".encode()).hexdigest()


def split_rows(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Deterministic: groups ranked by a seeded hash; the first groups reach `fraction` of the rows for val."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(split_key(row, seed), []).append(row)
    want = max(1, round(fraction * len(rows)))
    val_keys: set[tuple[int, int]] = set()
    for key in sorted(groups):
        if len(val_keys) >= want:
            break
        val_keys.update(r.key for r in groups[key])
    train = [r for r in rows if r.key not in val_keys]
    val = [r for r in rows if r.key in val_keys]
    return train, val


def _clean(problems: list[Problem]) -> list[Problem]:
    """Problem messages quote no row text, but parse errors echo what they choke on: redact to be sure.

    Every problem passes here on its way in, and the report's list once more before it is written. Redaction finds
    numbers and addresses, not names: messages must still never quote the data.
    """
    return [p.model_copy(update={"message": redact(p.message)[0]}) for p in problems]


def _finish(report: PrepareReport) -> None:
    report.problems = sorted(_clean(report.problems), key=_problem_order)
    report.problems_by_code = count_by_code(report.problems)


def _problem_order(p: Problem) -> tuple[str, int, str]:
    return (p.file or "", p.line, p.code)


def _gate(report: PrepareReport, options: PrepareOptions) -> None:
    if options.on_invalid == "fail" and report.problems:
        found = sorted(report.problems, key=_problem_order)
        raise DataInvalid(f"{len(found)} problem(s) in the data: {summarize(found)}; fix the rows, or set "
                          "`on_invalid: drop` to leave bad rows out", found)


class _Run:
    def __init__(self, report: PrepareReport, options: PrepareOptions, hooks: Hooks, two_files: bool) -> None:
        self.report = report
        self.options = options
        self.hooks = hooks
        self.two_files = two_files

    def problems(self, found: list[Problem]) -> None:
        """Record problems; refuse the file under `fail`, list the dropped rows under `drop`."""
        if not found:
            return
        found = _clean(found)
        self.report.problems += found
        if self.options.on_invalid == "fail":
            return  # refused at the next gate, once every check has had its say
        by_row: dict[tuple[str | None, int], list[str]] = {}
        for p in found:
            by_row.setdefault((p.file, p.line), []).append(p.code)
        self.report.dropped += [{"file": f, "line": line, "codes": codes} for (f, line), codes in by_row.items()]


def prepare(train_path: Path, out_dir: Path, *, model: str, models_dir: Path, options: PrepareOptions | None = None,
            validation_path: Path | None = None, hooks: Hooks | None = None) -> PrepareReport:
    """Run every stage and write `out_dir` atomically. Raises DataInvalid (report written, no data) on refusal."""
    options = options or PrepareOptions()
    hooks = hooks or Hooks()
    model_dir, manifest = resolve_model(model, models_dir)
    report = PrepareReport(model=model, model_manifest_sha256=manifest.canonical_sha256(),
                           chat_template_sha256=manifest.chat_template_sha256, options=options)
    run = _Run(report, options, hooks, validation_path is not None)
    try:
        train, val = _stages(run, train_path, validation_path, model_dir)
    except FinetuneError as exc:
        report.status = "failed"
        report.error = {"code": exc.code, "message": redact(str(exc))[0]}
        _finish(report)
        _publish(out_dir, {}, report)
        raise
    _finish(report)
    _publish(out_dir, {TRAIN_FILE: train, VAL_FILE: val}, report)
    return report


def _read(run: _Run, path: Path, role: Literal["train", "validation"]) -> list[Row]:
    opts = run.options
    intake: Intake = read_file(path, opts.format, opts.columns)
    run.report.inputs.append(InputFile(role=role, name=path.name, sha256=sha256_file(path), bytes=path.stat().st_size,
                                       format=intake.format, records=len(intake.rows) + len(intake.problems)))
    file = path.name if run.two_files else None
    problems = _clean([p.model_copy(update={"file": file}) for p in intake.problems])
    if intake.fatal or any(p.code in ("empty_file", "csv_missing_columns") for p in problems):
        run.report.problems += problems
        raise DataInvalid(f"{path.name}: {summarize(problems)}", problems)
    checked = validate_structure(intake.rows, file)
    run.problems(sorted(problems + checked.problems, key=lambda p: (p.line, p.code)))
    return checked.rows


def _refuse_pii(run: _Run, part: ScrubReport, file: str) -> None:
    """The lines and kinds, never the values (the report is kept and shown)."""
    kinds = ", ".join(f"{k} {n}" for k, n in part.counts.items() if n)
    problems = [Problem(line=line, code="pii_found", message="personal data; this team's policy refuses it",
                        file=file if run.two_files else None) for line in part.changed_lines]
    run.report.problems += problems
    raise DataInvalid(f"{file}: personal data ({kinds}) on {len(problems)} rows and this team's policy blocks it; "
                      f"remove it, or ask an admin for pii=redact (scrubbed before training): {summarize(problems)}",
                      problems)


def _install_pii_rules() -> PiiRules:
    """The rules file the gateway loads too, so that scrubbing hides what pii=redact hides."""
    try:
        return install_pii_rules()
    except ConfigError as exc:
        raise FinetuneError(f"the organisation's PII rules cannot be used: {exc}", code="pii_rules_invalid") from None


def _stages(run: _Run, train_path: Path, validation_path: Path | None,
            model_dir: Path) -> tuple[list[Row], list[Row]]:
    opts, report, hooks = run.options, run.report, run.hooks
    sets = {"train": _read(run, train_path, "train")}
    if validation_path is not None:
        sets["validation"] = _read(run, validation_path, "validation")
    report.stages["read"] = sum(i.records for i in report.inputs)
    report.stages["valid_structure"] = sum(len(rows) for rows in sets.values())

    if opts.scrub_pii or opts.refuse_pii:
        report.pii_rules = _install_pii_rules()
        total = ScrubReport()
        for name, rows in sets.items():
            scrubbed, part = scrub_rows(rows, hooks.stage(f"scrubbing PII ({name})", len(rows)))
            if opts.refuse_pii and part.changed_lines:
                _refuse_pii(run, part, (train_path if name == "train" else validation_path).name)
            # scrub_rows rebuilds rows from line and data alone; keep each row's record, its identity in an array.
            sets[name] = [replace(row, data=new.data) for row, new in zip(rows, scrubbed, strict=True)]
            for kind, n in part.counts.items():
                total.counts[kind] = total.counts.get(kind, 0) + n
            total.rows_changed += part.rows_changed
            total.messages_changed += part.messages_changed
            total.changed_lines += part.changed_lines
        report.scrub = total
    else:
        report.scrub = ScrubReport(enabled=False)

    check = TokenCheck(load_encoder(model_dir), opts.max_seq_len)
    stats: dict[tuple[str, tuple[int, int]], TokenStats] = {}
    found: list[Problem] = []
    for name, rows in sets.items():
        file = (train_path if name == "train" else validation_path).name if run.two_files else None
        checked = validate_tokens(rows, check, file, hooks.stage(f"checking tokens ({name})", len(rows)))
        found += checked.problems
        sets[name] = checked.rows
        stats.update({(name, key): s for key, s in checked.stats.items()})
    run.problems(found)
    _gate(report, opts)
    report.stages["valid_tokens"] = sum(len(rows) for rows in sets.values())

    if opts.dedup:
        dedup_total: DedupReport | None = None
        for name, rows in sets.items():
            sets[name], part = dedup(rows, threshold=opts.near_duplicate_threshold,
                                     progress=hooks.stage(f"deduplicating ({name})", len(rows)))
            if dedup_total is None:
                dedup_total = part
            else:
                dedup_total.rows_in += part.rows_in
                dedup_total.rows_out += part.rows_out
                dedup_total.exact_removed += part.exact_removed
                dedup_total.near_removed += part.near_removed
                dedup_total.removed += part.removed
        report.dedup = dedup_total
    report.stages["deduplicated"] = sum(len(rows) for rows in sets.values())

    if validation_path is None:
        if len(sets["train"]) < 2:
            raise FinetuneError(f"{len(sets['train'])} usable conversation(s) left; at least 2 are needed to hold "
                                "one out for validation", code="no_training_data")
        train, val = split_rows(sets["train"], opts.validation_fraction, opts.seed)
        report.split = {"method": "seeded hash of each conversation's opening, grouped",
                        "validation_fraction": opts.validation_fraction, "seed": opts.seed}
    else:
        train, val = sets["train"], sets["validation"]
        report.split = {"method": "validation file given"}
        hits = overlaps(train, val, threshold=opts.near_duplicate_threshold)
        run.problems([Problem(line=h.line, code="train_val_overlap", file=validation_path.name,
                              message=f"{'' if h.record is None else where(h.line, h.record) + ': '}repeats training "
                                      f"{where(h.duplicate_of, h.duplicate_of_record)} ({h.kind}"
                                      f"{'' if h.kind == 'exact' else f', Jaccard {h.similarity}'})")
                      for h in hits])
        _gate(report, opts)
        bad = {h.key for h in hits}
        val = [r for r in val if r.key not in bad]
    if not train or not val:
        raise FinetuneError("no conversation left for training or for validation after validation and dedup",
                            code="no_training_data")
    # Belt and braces: the split can only be trusted if nothing crossed it.
    crossed = overlaps(train, val, threshold=opts.near_duplicate_threshold)
    if crossed:
        raise FinetuneError(f"{len(crossed)} validation conversation(s) also in train (first: "
                            f"{where(crossed[0].line, crossed[0].record)})", code="train_val_overlap")
    report.split["overlap_checked"] = True
    report.split["train_lines"] = len(train)
    report.split["val_lines"] = len(val)
    report.stages["train"], report.stages["val"] = len(train), len(val)
    val_name = "validation" if validation_path is not None else "train"
    report.outputs[TRAIN_FILE] = _tokens(train, stats, "train")
    report.outputs[VAL_FILE] = _tokens(val, stats, val_name)
    return train, val


def _tokens(rows: list[Row], stats: dict[tuple[str, tuple[int, int]], TokenStats], name: str) -> OutputFile:
    return OutputFile(rows=len(rows), sha256="", bytes=0, tokens=sum(stats[(name, r.key)].tokens for r in rows),
                      trainable_tokens=sum(stats[(name, r.key)].trainable for r in rows))


def _row_json(row: Row) -> str:
    kept = {"messages": row.data["messages"], **({"tools": row.data["tools"]} if row.data.get("tools") else {})}
    return json.dumps(kept, ensure_ascii=False) + "\n"


def _publish(out_dir: Path, data: dict[str, list[Row]], report: PrepareReport) -> None:
    """Write into a temp folder beside out_dir, then swap it in; refuse to replace a folder we did not write."""
    out_dir = out_dir.resolve()
    if out_dir.exists() and any(p.name not in OUTPUTS for p in out_dir.iterdir()):
        raise FinetuneError(f"{out_dir} exists and holds files other than {', '.join(OUTPUTS)}; choose an empty or "
                            "new folder", code="output_exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        for name, rows in data.items():
            path = tmp / name
            with open(path, "w", encoding="utf-8", newline="\n") as f:
                f.writelines(_row_json(r) for r in rows)
                f.flush()
                os.fsync(f.fileno())
            entry = report.outputs[name]
            entry.sha256, entry.bytes = sha256_file(path), path.stat().st_size
        write_json_atomic(tmp / REPORT_FILE, report.model_dump(mode="json"))
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
