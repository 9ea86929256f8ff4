"""Fine-tune jobs: prepare → train → evaluate → export → gate, from a config or from a gateway job record.

    sovereign finetune run configs/finetune/ci-smoke.yaml      # creates a job under SOVEREIGN_HOME/jobs and runs it
    sovereign finetune run-job SOVEREIGN_HOME/jobs/<job_id>    # runs a job the gateway's /v1/fine_tuning/jobs wrote

A job folder holds `job.json` (sovereign.formats.JobRecord, statuses as OpenAI's), `events.jsonl` (one line per
stage and per training step, OpenAI's event shape), `prepared/` (the validated, scrubbed data), `checkpoints/<step>/`
(written by finetune.train, with metrics.json) and the trained `adapter/`. The gateway cancels a job by setting its
record's status to `cancelled` and stopping the worker; a SIGTERM with no cancel on the record (a drained node, an
evicted pod) leaves it `running` with its checkpoints, so running it again resumes. A job succeeds only
when the consistency gate passes; its `fine_tuned_model` is then the served name "name@version".

The record names the adapter (`adapter`) before it is published, so the gateway makes it the job's team's before any
replica can load it; a job that does not succeed removes the adapter it published (`adapter_removed_at`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from finetune.config import FinetuneConfig
from finetune.errors import FinetuneError
from finetune.evaluate import EvalReport, EvalSettings, find_canary_manifest, load_canaries, read_conversations
from finetune.gate import GateFailed, GateReport, GateSettings
from sovereign.errors import SovereignError
from sovereign.formats import JOB_RECORD, JobRecord, job_record_lock, sha256_file, utcnow
from sovereign.settings import HomeSettings, YamlSettings

EVENTS_FILE = "events.jsonl"
TERMINAL = ("succeeded", "failed", "cancelled")
STAGES = ("prepare", "train", "evaluate", "export", "gate")


class RunnerSettings(YamlSettings):
    """How jobs run here: where the served vLLM is (for the gate), which preset gateway jobs use, eval sizes."""

    model_config = SettingsConfigDict(env_prefix="SOVEREIGN_FINETUNE_", extra="ignore", env_nested_delimiter="__")

    serving_url: str = "http://127.0.0.1:8000"  # SOVEREIGN_FINETUNE_SERVING_URL
    serving_health_url: str | None = None  # the supervisor's health port, to quote why it refused an adapter
    job_config: str = "customer-service"  # configs/finetune/<preset> for jobs created through the gateway
    evaluation: EvalSettings = Field(default_factory=EvalSettings)
    gate_samples: int = Field(4, ge=1)
    gate_tool_samples: int = Field(8, ge=0)  # held-out prompts answered with a tool call, measured at the gate
    gate_load_timeout_s: float = Field(180, gt=0)
    fail_on_leak: bool = True  # a trained canary that comes back fails the job

    def gate_settings(self) -> GateSettings:
        return GateSettings(serving_url=self.serving_url, health_url=self.serving_health_url,
                            samples=self.gate_samples, tool_samples=self.gate_tool_samples,
                            load_timeout_s=self.gate_load_timeout_s)


class JobCancelled(BaseException):
    """Like KeyboardInterrupt, a BaseException: no `except Exception` (or FinetuneError) on the way may swallow it."""

    code = "cancelled"


class LeakDetected(FinetuneError):
    code = "canary_leak"


# ------------------------------------------------------------------------------------------------ events

EventSink = Callable[[str, str, str, dict[str, Any]], None]  # (level, type, message, data)


class EventLog:
    """`events.jsonl`: {"id", "created_at", "level", "message", "type", "data"}, appended one whole line at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, level: str, type_: str, message: str, data: dict[str, Any]) -> None:
        line = json.dumps({"id": f"ftevent-{secrets.token_hex(12)}", "created_at": int(time.time()),
                           "level": level, "message": message, "type": type_, "data": data},
                          ensure_ascii=False, default=str)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ the pipeline

@dataclass
class PipelineResult:
    served_name: str
    adapter_path: Path
    trained_tokens: int
    best_step: int
    train_metrics: dict[str, Any]
    evaluation: EvalReport
    gate: GateReport | None
    prepared_dir: Path
    timings: dict[str, float] = field(default_factory=dict)


class Pipeline:
    """One fine-tune run in `work_dir`; `emit` receives every stage change and training event."""

    def __init__(self, config: FinetuneConfig, work_dir: Path, *, settings: RunnerSettings, home: HomeSettings,
                 emit: EventSink, origin: dict[str, Any], adapter_name: str | None = None,
                 check_cancel: Callable[[], None] = lambda: None, skip_gate: bool = False,
                 show_progress: bool = False, claim_adapter: Callable[[str], None] = lambda served_name: None
                 ) -> None:
        self.config = config
        self.work_dir = work_dir
        self.settings = settings
        self.home = home
        self.emit = emit
        self.origin = origin
        self.adapter_name = adapter_name or config.name
        self.check_cancel = check_cancel
        self.skip_gate = skip_gate
        self.show_progress = show_progress
        self.claim_adapter = claim_adapter
        self.published = None  # the RegisteredAdapter once export has published it
        self.timings: dict[str, float] = {}

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        self.check_cancel()
        self.emit("info", "message", f"Stage {name} started", {"stage": name, "state": "started"})
        t0 = time.monotonic()
        yield
        self.timings[name] = round(time.monotonic() - t0, 2)
        self.emit("info", "message", f"Stage {name} finished in {self.timings[name]:.1f}s",
                  {"stage": name, "state": "finished", "seconds": self.timings[name]})

    def run(self) -> PipelineResult:
        with self._stage("prepare"):
            prepared = self.prepare()
        with self._stage("train"):
            trained = self.train(prepared)
        with self._stage("evaluate"):
            report = self.evaluate(prepared, trained.adapter_dir)
        with self._stage("export"):
            adapter = self.export(prepared, trained, report)
        gate = None
        if self.skip_gate:
            self.emit("warn", "message", "Consistency gate skipped (--skip-gate): the adapter is published but not "
                      "proven to be served as trained", {"stage": "gate", "state": "skipped"})
        else:
            with self._stage("gate"):
                gate = self.gate(prepared, adapter)
        return PipelineResult(served_name=adapter.served_name, adapter_path=adapter.path,
                              trained_tokens=trained.trained_tokens, best_step=trained.best_step,
                              train_metrics=dict(trained.metrics), evaluation=report, gate=gate,
                              prepared_dir=prepared, timings=self.timings)

    # -- stages ----------------------------------------------------------------------------------------------

    def prepare(self) -> Path:
        """Reuse a prepared folder made from the same input file, else run `prepare` into it."""
        from finetune.prepare import PrepareOptions, prepare

        data = self.config.data
        prepared = Path(data.prepared_dir) if data.prepared_dir else self.work_dir / "prepared"
        if self._prepared_is_current(prepared):
            self.emit("info", "message", f"Using prepared data in {prepared}", {"prepared_dir": str(prepared)})
            return prepared
        if data.train_file is None:
            raise FinetuneError("the config names no data.train_file and no prepared data.prepared_dir",
                                code="no_training_data")
        report = prepare(Path(data.train_file), prepared, model=self.config.model, models_dir=self.home.models_dir,
                         options=PrepareOptions.from_config(self.config),
                         validation_path=Path(data.validation_file) if data.validation_file else None)
        outputs = {k: v.rows for k, v in report.outputs.items()}
        self.emit("info", "message", f"Validated {Path(data.train_file).name}: "
                  + ", ".join(f"{k} {v} rows" for k, v in outputs.items()),
                  {"outputs": outputs, "stages": report.stages,
                   "scrubbed": report.scrub.model_dump() if report.scrub else None})
        return prepared

    def _prepared_is_current(self, prepared: Path) -> bool:
        report_path = prepared / "prepare_report.json"
        if not all((prepared / f).is_file() for f in ("train.jsonl", "val.jsonl")) or not report_path.is_file():
            return False
        report = json.loads(report_path.read_text(encoding="utf-8"))
        if report.get("status", "succeeded") != "succeeded":
            return False
        train_file = self.config.data.train_file
        if train_file is None:
            return True  # only a prepared folder was given: it is the data
        inputs = {i.get("role"): i.get("sha256") for i in report.get("inputs", [])}
        if not Path(train_file).is_file() or inputs.get("train") != sha256_file(Path(train_file)):
            return False
        # Made from the same file with other settings (PII kept, another model's tokenizer, another validation file)
        # is not this config's data.
        from finetune.prepare import PrepareOptions

        validation = self.config.data.validation_file
        return (report.get("options") == PrepareOptions.from_config(self.config).model_dump(mode="json")
                and report.get("model") == self.config.model
                and inputs.get("validation") == (sha256_file(Path(validation)) if validation else None)
                and not _pii_rules_changed(report))

    def train(self, prepared: Path):
        from finetune.train import train

        def on_event(kind: str, message: str, data: dict[str, Any]) -> None:
            self.check_cancel()
            level = "warn" if kind == "warning" else "info"
            self.emit(level, "metrics" if kind == "metrics" else "message", message, {"stage": "train",
                      "kind": kind, **data})

        return train(self.config, prepared, self.work_dir, on_event=on_event, resume=True, home=self.home,
                     progress=self.show_progress)

    def evaluate(self, prepared: Path, adapter_dir: Path) -> EvalReport:
        from finetune.evaluate import evaluate

        manifest = find_canary_manifest(Path(self.config.data.train_file) if self.config.data.train_file else None)
        canaries = load_canaries(manifest) if manifest else []
        settings = self.settings.evaluation.model_copy(update={"max_seq_len": self.config.training.max_seq_len})
        report = evaluate(self.home.models_dir / self.config.model, adapter_dir,
                          read_conversations(prepared / "val.jsonl"),
                          train=read_conversations(prepared / "train.jsonl"), canaries=canaries, settings=settings,
                          progress=self._evaluation_progress, **self._placement())
        m = report.metrics()
        self.emit("info", "metrics", f"Validation loss {m['val_loss_base']:.4f} (base) -> {m['val_loss']:.4f} "
                  f"(adapter); perplexity {m['val_perplexity_base']:.2f} -> {m['val_perplexity']:.2f}",
                  {"stage": "evaluate", **m})
        if not report.improved:
            self.emit("warn", "message", "The adapter's validation loss is not lower than the base model's",
                      {"stage": "evaluate"})
        if report.leak.note:
            self.emit("warn", "message", f"Leak probe: {report.leak.note}", {"stage": "evaluate"})
        if report.leak.leaked:
            message = (f"{len(report.leak.leaked)} canary string(s) planted in the training data come back from "
                       f"the adapter: it memorised training data; train for fewer steps or scrub harder")
            if self.settings.fail_on_leak:
                raise LeakDetected(message)
            self.emit("warn", "message", message, {"stage": "evaluate", "leaked": report.leak.leaked})
        return report

    def _evaluation_progress(self, what: str, step: int, steps: int) -> None:
        self.check_cancel()  # a cancel is noticed between phases, not only once the whole stage is done
        self.emit("info", "message", f"Evaluating: {what} ({step}/{steps})",
                  {"stage": "evaluate", "step": step, "steps": steps})

    def _placement(self) -> dict[str, Any]:
        """Evaluation runs where training ran: on a GPU host the model is scored there in the training dtype, not as
        a float32 copy in host memory (a 7B model: 28 GB and minutes per answer on the CPU)."""
        from finetune.train import pick_device_dtype

        device, dtype = pick_device_dtype(self.config)
        return {"device": device.type, "dtype": dtype}

    def export(self, prepared: Path, trained, report: EvalReport):
        from finetune.export import ExportRefused, export_adapter
        from serving.adapters import AdapterRegistry

        metrics = {**report.metrics(), "best_step": trained.best_step, "trained_tokens": trained.trained_tokens,
                   "training": dict(trained.metrics)}
        registry = AdapterRegistry(self.home.adapters_dir)
        for attempt in range(3):
            version = registry.next_version(self.adapter_name)
            # Named before it exists: the supervisor loads whatever appears in the registry, and the gateway must
            # already know whose it is by then.
            self.claim_adapter(f"{self.adapter_name}@{version}")
            try:
                adapter = export_adapter(
                    trained.adapter_dir, name=self.adapter_name, base_model=self.config.model, prepared_dir=prepared,
                    config=self.config.model_dump(mode="json"), seed=self.config.training.seed, metrics=metrics,
                    home=self.home, serving_profile=self.config.serving_profile, version=version, origin=self.origin,
                    extra_lineage={"evaluation": report.model_dump(mode="json"),
                                   "training": {"best_step": trained.best_step,
                                                "trained_tokens": trained.trained_tokens}})
                break
            except ExportRefused:
                if attempt == 2 or not (registry.root / self.adapter_name / version).exists():
                    raise
                # another job published this version meanwhile: name the next one
        self.published = adapter
        self.emit("info", "message", f"Published adapter {adapter.served_name} to {adapter.path}",
                  {"stage": "export", "served_name": adapter.served_name, "path": str(adapter.path)})
        return adapter

    def gate(self, prepared: Path, adapter) -> GateReport:
        from finetune.evaluate import gate_reference
        from finetune.export import record_gate
        from finetune.gate import run_gate
        from finetune.masking import ChatEncoder

        model_dir = self.home.models_dir / self.config.model
        encoder = ChatEncoder.from_model_dir(model_dir)
        conversations = read_conversations(prepared / "val.jsonl")
        settings = self.settings.gate_settings()
        # Scored from the registry's copy, which is what vLLM loads; the model is freed when this returns.
        reference = gate_reference(model_dir, adapter.path, conversations, settings.samples, encoder=encoder,
                                   **self._placement())
        report = run_gate(encoder=encoder, conversations=conversations, base_model=self.config.model,
                          served_name=adapter.served_name, settings=settings, reference=reference)
        for check in report.checks:
            self.emit("info" if check.passed else "error", "message", f"Gate {check.name}: {check.message}",
                      {"stage": "gate", "check": check.name, "passed": check.passed})
        if report.tool_calls:
            base, tuned = report.tool_calls["base"], report.tool_calls["adapter"]
            self.emit("info", "metrics", f"Tool calls on {tuned.prompts} held-out prompts, as vLLM serves them: base "
                      f"{base.summary()} -> adapter {tuned.summary()}",
                      {"stage": "gate", **base.counts("base_"), **tuned.counts()})
        elif report.tool_calls_error:
            self.emit("warn", "message", f"Tool calls not measured: {report.tool_calls_error}", {"stage": "gate"})
        if not report.passed:
            raise GateFailed(report)  # the job runner removes the adapter
        record_gate(adapter, report.model_dump(mode="json"))
        return report


# ------------------------------------------------------------------------------------------------ job records

def new_job_id() -> str:
    return f"ftjob-{secrets.token_hex(12)}"


def _adapter_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:64]
    return name or "ft"


def config_for_job(record: JobRecord, settings: RunnerSettings, files_dir: Path) -> FinetuneConfig:
    """The job's fine-tune config.

    A record written by `sovereign finetune run` carries its whole config. One from the gateway names uploaded files
    and OpenAI hyperparameters: those go on top of a preset (`config` in the record, else settings.job_config).
    """
    extra = record.model_extra or {}
    if isinstance(extra.get("config"), dict):
        return _validated(record, dict(extra["config"]))
    training_file = resolve_file(record.training_file, files_dir, "training_file")
    validation_file = (resolve_file(record.validation_file, files_dir, "validation_file")
                       if record.validation_file else None)
    data = FinetuneConfig.named(extra.get("config") or settings.job_config).model_dump(mode="json")
    data["model"] = record.model
    data["name"] = _adapter_name(record.suffix or data.get("name") or "ft")
    data["data"] = {**data.get("data", {}), "train_file": str(training_file),
                    "validation_file": str(validation_file) if validation_file else None, "prepared_dir": None}
    team_pii = extra.get("team_pii")  # the creating team's policy outranks the preset: it may only tighten it
    if team_pii in ("redact", "block"):
        data["data"]["scrub_pii"] = True
        data["data"]["refuse_pii"] = team_pii == "block"
    hp = dict(record.hyperparameters or {})
    method = extra.get("method")
    if isinstance(method, dict):  # OpenAI's newer shape: method.supervised.hyperparameters
        hp.update(((method.get(method.get("type", "supervised")) or {}).get("hyperparameters")) or {})
    training = dict(data.get("training", {}))
    if isinstance(hp.get("n_epochs"), int):
        training["epochs"] = hp["n_epochs"]
    if isinstance(hp.get("batch_size"), int):
        training["batch_size"] = hp["batch_size"]
    if isinstance(hp.get("learning_rate_multiplier"), (int, float)):
        training["learning_rate"] = training.get("learning_rate", 2e-4) * float(hp["learning_rate_multiplier"])
    if record.seed is not None:
        training["seed"] = record.seed
    data["training"] = training
    return _validated(record, data)


def _validated(record: JobRecord, data: dict[str, Any]) -> FinetuneConfig:
    try:
        return FinetuneConfig(**data)
    except SovereignError:
        raise
    except ValueError as exc:
        raise JobError(f"job {record.id}: the job's settings do not make a valid fine-tune config: {exc}",
                       code="invalid_hyperparameters", param="hyperparameters") from None


def resolve_file(ref: str, files_dir: Path, param: str) -> Path:
    """A file id from /v1/files (stored under SOVEREIGN_HOME/files) or a local path."""
    candidates = [Path(ref), files_dir / ref, files_dir / f"{ref}.jsonl", files_dir / ref / "content",
                  files_dir / ref / "data.jsonl"]
    for c in candidates:
        if c.is_file():
            return c
    folder = files_dir / ref
    if folder.is_dir():
        data = [p for p in folder.iterdir() if p.is_file() and not p.name.endswith(".json") and not
                p.name.startswith(".")]
        if len(data) == 1:
            return data[0]
    raise JobError(f"{param} {ref!r} is neither an uploaded file in {files_dir} nor a local path",
                   code="invalid_file", param=param)


class JobError(FinetuneError):
    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message, code=code)
        self.param = param


class JobRunner:
    """Runs one job folder to a terminal status; the record and events are what the gateway shows."""

    def __init__(self, job_dir: Path, *, settings: RunnerSettings | None = None, home: HomeSettings | None = None,
                 show_progress: bool = False, skip_gate: bool = False, on_event: EventSink | None = None) -> None:
        self.job_dir = job_dir
        self.settings = settings or RunnerSettings()
        self.home = home or HomeSettings()
        self.events = EventLog(job_dir / EVENTS_FILE)
        self.show_progress = show_progress
        self.skip_gate = skip_gate
        self.on_event = on_event
        self._cancel = threading.Event()
        self._finishing = False  # set once the job's outcome is being written down
        self._signalled = False  # SIGTERM arrived: a cancel only if the record says so, else the host stopping us
        self.pipeline: Pipeline | None = None
        self.result: PipelineResult | None = None

    # -- record --------------------------------------------------------------------------------------------

    def read(self) -> JobRecord:
        path = self.job_dir / JOB_RECORD
        if not path.is_file():
            raise JobError(f"{path}: no job record; a job folder holds job.json written by the gateway",
                           code="job_not_found")
        return JobRecord.read(path)

    def _update(self, **changes: Any) -> JobRecord:
        with job_record_lock(self.job_dir):  # the gateway's cancel is a read-modify-write of the same file
            record = self.read()
            if record.status == "cancelled" and changes.get("status") not in (None, "cancelled"):
                changes.pop("status")  # the gateway cancelled it meanwhile: that wins
            record = record.model_copy(update=changes)
            record.write(self.job_dir / JOB_RECORD)
            return record

    def emit(self, level: str, type_: str, message: str, data: dict[str, Any]) -> None:
        self.events(level, type_, message, data)
        if self.on_event:
            self.on_event(level, type_, message, data)

    def check_cancel(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled("the job was cancelled (SIGTERM)")
        if self.read().status == "cancelled":
            self._cancel.set()
            raise JobCancelled("the job was cancelled")

    def cancel(self) -> None:
        self._cancel.set()

    # -- run -----------------------------------------------------------------------------------------------

    def run(self) -> JobRecord:
        record = self.read()
        if record.status in TERMINAL:
            raise JobError(f"job {record.id} is already {record.status}; create a new job", code="job_finished")
        with self._exclusive(record):
            previous = (signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread()
                        else None)
            if previous is not None:
                signal.signal(signal.SIGTERM, self._on_sigterm)
            try:
                return self._run(record)
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)

    @contextmanager
    def _exclusive(self, record: JobRecord) -> Iterator[None]:
        """One runner per job folder: a second `run-job` on a job being run is refused, a crashed one's is not."""
        with open(self.job_dir / ".runner.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise JobError(f"job {record.id} is being run by another process", code="job_running") from None
            lock.write(f"{os.getpid()}\n")
            lock.flush()
            yield

    def _on_sigterm(self, signum, frame) -> None:
        self._cancel.set()
        self._signalled = True
        if self._finishing:
            return  # cutting the bookkeeping short could leave a published adapter behind a cancelled job
        # Raised here it stops training at the next Python line; checkpoints already written stay for a resume.
        raise JobCancelled("the job was cancelled (SIGTERM)")

    def _run(self, record: JobRecord) -> JobRecord:
        resumed = record.status == "running"
        record = self._update(status="running", started_at=record.started_at or utcnow(), error=None)
        self.emit("info", "message", "Fine-tuning job resumed" if resumed else "Fine-tuning job started",
                  {"job_id": record.id, "model": record.model})
        try:
            config = config_for_job(record, self.settings, self.home.files_dir)
            self.pipeline = Pipeline(config, self.job_dir, settings=self.settings, home=self.home, emit=self.emit,
                                     origin={"kind": "finetune_job", "job_id": record.id,
                                             "training_file": record.training_file},
                                     check_cancel=self.check_cancel, skip_gate=self.skip_gate,
                                     show_progress=self.show_progress,
                                     claim_adapter=lambda served_name: self._update(adapter=served_name))
            self.result = self.pipeline.run()
            return self._succeeded()
        except JobCancelled:
            if self._signalled and self.read().status != "cancelled":
                return self._interrupted()
            return self._cancelled()
        except GateFailed as exc:
            return self._fail("gate_failed", str(exc), None, {"gate": exc.report.model_dump(mode="json")})
        except JobError as exc:
            return self._fail(exc.code, str(exc), exc.param)
        except SovereignError as exc:
            return self._fail(exc.code, str(exc), None)
        except Exception as exc:  # a bug or a crash inside a library: the job still ends failed, with the reason
            return self._fail("internal_error", f"{type(exc).__name__}: {exc}", None,
                              {"traceback": traceback.format_exc(limit=8)})

    def _succeeded(self) -> JobRecord:
        self._finishing = True
        r = self.result
        record = self._update(status="succeeded", finished_at=utcnow(), fine_tuned_model=r.served_name,
                              trained_tokens=r.trained_tokens)
        if record.status == "cancelled":  # after the gate passed: a cancelled job leaves nothing callable either
            return self._cancelled()
        self.emit("info", "message", "The job has successfully completed",
                  {"fine_tuned_model": r.served_name, "trained_tokens": r.trained_tokens,
                   "val_loss_base": r.evaluation.base.loss, "val_loss": r.evaluation.adapter.loss})
        return record

    def _interrupted(self) -> JobRecord:
        """SIGTERM without a cancel on the record: a node drained, a pod evicted, the machine shutting down. The job
        stays `running` with its checkpoints, so the same job run again (Kubernetes reruns the Job's pod) resumes."""
        self._finishing = True
        self._withdraw()  # an adapter of a run that did not finish is not callable; the resumed run publishes anew
        record = self.read()
        self.emit("warn", "message", "Fine-tuning job interrupted (SIGTERM): checkpoints kept; running the job "
                  "again resumes it", {"job_id": record.id})
        return record

    def _cancelled(self) -> JobRecord:
        self._finishing = True
        self._withdraw()
        record = self._update(status="cancelled", finished_at=utcnow())
        self.emit("info", "message", "Fine-tuning job cancelled", {"job_id": record.id})
        return record

    def _withdraw(self) -> None:
        """Remove the adapter this run published: only a succeeded job leaves one that clients could call."""
        from serving.adapters import AdapterRegistry
        from serving.errors import AdapterNotFound, ServingError

        adapter = self.pipeline.published if self.pipeline is not None else None
        if adapter is None:
            return
        try:
            AdapterRegistry(self.home.adapters_dir).remove(adapter.manifest.name, adapter.manifest.version)
        except AdapterNotFound:
            pass
        except ServingError as exc:  # the job still ends; the adapter stays its team's (the record names it)
            self.emit("error", "message", f"Could not remove adapter {adapter.served_name}: {exc}",
                      {"served_name": adapter.served_name})
            return
        self.pipeline.published = None
        # The record keeps naming it (`adapter`): replicas may serve it until their next registry poll.
        self._update(adapter_removed_at=int(time.time()))
        self.emit("info", "message", f"Removed adapter {adapter.served_name}: the job did not succeed",
                  {"served_name": adapter.served_name})

    def _fail(self, code: str, message: str, param: str | None, data: dict[str, Any] | None = None) -> JobRecord:
        self._finishing = True
        self._withdraw()
        record = self._update(status="failed", finished_at=utcnow(),
                              error={"code": code, "message": message, "param": param})
        self.emit("error", "message", f"Fine-tuning job failed: {message}", {"code": code, **(data or {})})
        return record


def create_local_job(config: FinetuneConfig, config_path: Path | None, home: HomeSettings) -> Path:
    """A job folder for `sovereign finetune run`: the same record the gateway writes, carrying the whole config."""
    data = config.data
    resolved = {}
    for field in ("train_file", "validation_file", "prepared_dir"):
        path = getattr(data, field)
        if path is None:
            continue
        if field != "prepared_dir" and not Path(path).is_file():
            raise FinetuneError(f"data.{field}: {path}: no such file (a relative path is read from {Path.cwd()}; "
                                f"`sovereign finetune sample-data data/finetune` writes the sample conversations the "
                                f"shipped configs train on)", code="file_not_found")
        resolved[field] = Path(path).resolve()  # the job may run, or be read, from elsewhere
    config = config.model_copy(update={"data": data.model_copy(update=resolved)})
    data = config.data
    job_id = new_job_id()
    job_dir = home.jobs_dir / job_id
    job_dir.mkdir(parents=True)
    training = str(data.train_file) if data.train_file else str(data.prepared_dir)
    record = JobRecord(id=job_id, status="queued", model=config.model, training_file=training,
                       validation_file=str(data.validation_file) if data.validation_file else None,
                       hyperparameters={"n_epochs": config.training.epochs,
                                        "learning_rate": config.training.learning_rate},
                       suffix=config.name, seed=config.training.seed,
                       config=config.model_dump(mode="json"),
                       config_path=str(config_path) if config_path else None)
    record.write(job_dir / JOB_RECORD)
    return job_dir


def _pii_rules_changed(report: dict[str, Any]) -> bool:
    """Scrubbed under another version of the organisation's PII rules (a kind added since would not be hidden)."""
    if not (report.get("scrub") or {}).get("enabled"):
        return False
    from sovereign.pii_rules import rules_path

    try:
        path = rules_path()
    except SovereignError:
        return True  # prepare names the problem
    now = sha256_file(path) if path is not None else None
    return (report.get("pii_rules") or {}).get("sha256") != now
