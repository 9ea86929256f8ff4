"""The objects the files and jobs API return validate against the `openai` SDK's own types (the SDK itself builds
responses without validation, so the API tests alone would not notice a wrong type)."""

from __future__ import annotations

import json

from openai.types import FileDeleted, FileObject
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint

from gateway.file_store import file_object
from gateway.job_store import JobStore, job_object, new_job_id
from sovereign.formats import JobRecord, utcnow, write_json_atomic


def strict(model, obj: dict):
    out = model.model_validate(obj, strict=False)
    assert set(obj) <= set(model.model_fields) | {"user_provided_suffix"}, set(obj) - set(model.model_fields)
    return out


def test_job_objects_validate_as_the_sdk_types(tmp_path):
    store = JobStore(tmp_path)
    queued = JobRecord(id=new_job_id(), status="queued", model="m", training_file="file-a", owner="t", seed=3,
                       hyperparameters={"n_epochs": 2}, runner="local", metadata={"k": "v"})
    job = strict(FineTuningJob, job_object(queued))
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == "auto"
    assert job.finished_at is None and job.error is None and job.metadata == {"k": "v"}

    failed = queued.model_copy(update={"status": "failed", "finished_at": utcnow(),
                                       "error": {"code": "invalid_file", "message": "line 3: x", "param": None}})
    job = strict(FineTuningJob, job_object(failed))
    assert job.error.code == "invalid_file" and isinstance(job.finished_at, int)

    store.job_dir(queued.id).mkdir()
    store.append_event(queued.id, "Created")
    with open(store.job_dir(queued.id) / "events.jsonl", "a") as f:
        f.write(json.dumps({"id": "ftevent-x", "created_at": 5, "level": "warning", "message": "m",
                            "type": "metrics", "data": {"step": 1}}) + "\n")
        f.write('{"id": "half a line')  # a line being written is not an event yet
    events = [strict(FineTuningJobEvent, e) for e in store.events(queued.id)]
    assert [e.id for e in events][0] == "ftevent-x" and events[0].level == "warn" and len(events) == 2

    write_json_atomic(store.job_dir(queued.id) / "checkpoints" / "8" / "metrics.json",
                      {"step": 8, "train_loss": 1.5, "valid_loss": None, "note": "text is dropped"})
    (store.job_dir(queued.id) / "checkpoints" / ".tmp-12").mkdir()
    [ckpt] = store.checkpoints(queued)
    c = strict(FineTuningJobCheckpoint, ckpt)
    assert c.step_number == 8 and c.metrics.train_loss == 1.5 and "note" not in ckpt["metrics"]


def test_file_objects_validate_as_the_sdk_types():
    meta = {"id": "file-1", "bytes": 10, "created_at": 1, "filename": "a.jsonl", "purpose": "fine-tune",
            "owner": "t", "sha256": "0" * 64}
    f = strict(FileObject, file_object(meta))
    assert f.status == "processed" and f.purpose == "fine-tune"
    assert FileDeleted.model_validate({"id": "file-1", "object": "file", "deleted": True}).deleted


def test_events_skip_a_line_cut_inside_a_character(tmp_path):
    store = JobStore(tmp_path)
    job_id = new_job_id()
    store.job_dir(job_id).mkdir()
    store.append_event(job_id, "已创建")
    # The worker appends a line over 8 KiB in several writes: the file may end inside a multi-byte character.
    line = json.dumps({"id": "ftevent-2", "created_at": 1, "message": "已验证训练文件" * 2000}, ensure_ascii=False)
    with open(store.job_dir(job_id) / "events.jsonl", "ab") as f:
        f.write(line.encode()[:8193])
    assert [e["message"] for e in store.events(job_id)] == ["已创建"]
