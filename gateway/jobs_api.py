"""OpenAI's `/v1/fine_tuning/jobs`: create, list, retrieve, cancel, events, checkpoints.

Create checks what it can at once (the base model exists and the team may use it, the files are the team's
fine-tune uploads, the hyperparameters are in range) and answers with an OpenAI error object otherwise; it then
writes the job record as `queued` and wakes the runner. Deeper data validation is the worker's first stage, whose
refusals (with line numbers) arrive as the job's error and events.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from gateway import errors as E
from gateway.caller import Caller
from gateway.file_store import FileStore, paginate
from gateway.job_runner import JobRunner
from gateway.job_store import JobStore, job_object, new_job_id
from sovereign.formats import JobRecord

Auto = Literal["auto"]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Bounds on the numeric branch only: on the whole union pydantic applies them to "auto" too (a 500).
    n_epochs: Annotated[int, Field(ge=1, le=50)] | Auto | None = None
    batch_size: Annotated[int, Field(ge=1, le=256)] | Auto | None = None
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=10)] | Auto | None = None

    def explicit(self) -> dict[str, Any]:
        """The values the caller chose; "auto" is left out so the worker takes the preset's value."""
        return {k: v for k, v in self.model_dump().items() if v not in (None, "auto")}


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Optional although OpenAI requires it: requests that name only `supervised` have always been accepted.
    type: str = "supervised"
    supervised: Supervised | None = None
    # OpenAI's other methods, accepted as shapes so that create can answer `unsupported_method` for them.
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    training_file: str = Field(min_length=1)
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    # OpenAI's documented limits; the record is read back on every list of the team's jobs.
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16)
    method: Method | None = None
    integrations: list[Any] | None = None


def _method_hyperparameters(method: Method | None) -> dict[str, Any]:
    if method is None:
        return {}
    if method.type != "supervised":
        raise E.invalid_request(f"method.type {method.type!r} is not supported; this platform trains supervised LoRA "
                                f"adapters (method.type 'supervised').", param="method.type",
                                code="unsupported_method")
    hp = method.supervised.hyperparameters if method.supervised else None
    return hp.explicit() if hp is not None else {}


def _with_metadata(records: list[JobRecord], params: list[tuple[str, str]]) -> list[JobRecord]:
    """OpenAI's filter (what the SDK sends for `jobs.list(metadata={...})`): `metadata[k]=v` keeps the jobs whose
    metadata has k = v, all of them; `metadata=null` the jobs without metadata."""
    wanted = {k[9:-1]: v for k, v in params if k.startswith("metadata[") and k.endswith("]")}
    if any(k == "metadata" and v == "null" for k, v in params):
        return [r for r in records if not (r.model_extra or {}).get("metadata")]
    if not wanted:
        return records
    return [r for r in records
            if all(((r.model_extra or {}).get("metadata") or {}).get(k) == v for k, v in wanted.items())]


def build_jobs_router(jobs: JobStore, files: FileStore, runner: JobRunner, *,
                      base_models: Callable[[], list[str]], runner_mode: str, preset: str | None) -> APIRouter:
    router = APIRouter()

    def owned(job_id: str, team: str) -> JobRecord:
        record = jobs.read(job_id)
        if record is None or record.owner != team:
            raise E.GatewayError(404, f"No fine-tuning job with id {job_id}.", code="fine_tuning_job_not_found",
                                 param="fine_tuning_job_id")
        return record

    def check_file(file_id: str, team: str, param: str) -> None:
        try:
            meta = files.get(file_id, team, param=param)
        except E.GatewayError:
            raise E.invalid_request(f"{param} {file_id!r} is not a file of your team; upload it with POST /v1/files "
                                    f"(purpose 'fine-tune') and pass its id.", param=param,
                                    code="invalid_file") from None
        if meta.get("purpose") != "fine-tune":
            raise E.invalid_request(f"{param} {file_id} was uploaded with purpose {meta.get('purpose')!r}, not "
                                    f"'fine-tune'.", param=param, code="invalid_file_purpose")

    @router.post("/v1/fine_tuning/jobs")
    async def create(spec: JobCreate, entry: Caller) -> dict:
        team = entry.team
        if spec.model not in base_models():
            raise E.invalid_request(f"Model {spec.model!r} is not available for fine-tuning; fine-tune one of the "
                                    f"served base models: {', '.join(sorted(base_models())) or 'none configured'}.",
                                    param="model", code="model_not_available")
        if not team.allows(spec.model):
            raise E.model_not_allowed(spec.model, team.name)
        if spec.integrations:
            raise E.invalid_request("integrations are not supported: nothing leaves this platform.",
                                    param="integrations", code="unsupported_integration")
        check_file(spec.training_file, team.name, "training_file")
        if spec.validation_file:
            check_file(spec.validation_file, team.name, "validation_file")
        hp = {**(spec.hyperparameters.explicit() if spec.hyperparameters else {}),
              **_method_hyperparameters(spec.method)}
        # The team's PII policy as the job's data policy (redact: scrubbed; block: refused), fixed at creation.
        extra: dict[str, Any] = {"runner": runner_mode, "created_by_key": entry.id, "team_pii": team.pii}
        if preset:
            extra["config"] = preset
        if spec.metadata:
            extra["metadata"] = spec.metadata
        record = JobRecord(id=new_job_id(), status="queued", model=spec.model, training_file=spec.training_file,
                           validation_file=spec.validation_file, hyperparameters=hp, suffix=spec.suffix,
                           seed=spec.seed if spec.seed is not None else random.randrange(2**31), owner=team.name,
                           **extra)

        def write() -> None:
            jobs.job_dir(record.id).mkdir(parents=True)
            jobs.append_event(record.id, f"Created fine-tuning job: {record.id}")
            jobs.append_event(record.id, f"Validated training file: {spec.training_file}")
            jobs.write(record)  # last: the runner only sees a job once its record is whole

        await asyncio.to_thread(write)
        runner.wake()
        return job_object(record)

    @router.get("/v1/fine_tuning/jobs")
    async def list_jobs(request: Request, entry: Caller, after: str | None = None,
                        limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict:
        records = _with_metadata(await asyncio.to_thread(jobs.owned, entry.team.name),
                                 request.query_params.multi_items())
        await runner.take_in(records)  # may wait for a discovery: only for the jobs listed
        page = paginate([job_object(r) for r in records], after, limit)
        return {"object": "list", "data": page["data"], "has_more": page["has_more"]}

    @router.get("/v1/fine_tuning/jobs/{job_id}")
    async def retrieve(job_id: str, entry: Caller) -> dict:
        record = owned(job_id, entry.team.name)
        await runner.take_in([record])
        return job_object(record)

    @router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel(job_id: str, entry: Caller) -> dict:
        record = owned(job_id, entry.team.name)
        async with runner.lock:  # not in the middle of a scan that might be starting this very job
            cancelled = await asyncio.to_thread(runner.cancel, job_id)
        if cancelled is None:
            record = jobs.read(job_id) or record
            raise E.invalid_request(f"Job {job_id} has already {record.status}; only queued or running jobs can be "
                                    f"cancelled.", param="fine_tuning_job_id", code="job_not_cancellable")
        return job_object(cancelled)

    @router.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def events(job_id: str, entry: Caller, after: str | None = None,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> dict:
        await runner.take_in([owned(job_id, entry.team.name)])
        page = paginate(await asyncio.to_thread(jobs.events, job_id), after, limit)
        return {"object": "list", "data": page["data"], "has_more": page["has_more"]}

    @router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def checkpoints(job_id: str, entry: Caller, after: str | None = None,
                          limit: Annotated[int, Query(ge=1, le=100)] = 10) -> dict:
        record = owned(job_id, entry.team.name)
        return paginate(await asyncio.to_thread(jobs.checkpoints, record), after, limit)

    return router
