"""A real, tiny fine-tune worker for the jobs API tests: does to JOB_DIR what `sovereign finetune run-job` does
(record to running, events, checkpoints/<step>/metrics.json, a terminal status), in a second instead of minutes.

Behaviour by the job's suffix: `crash` exits with code 3 while running; `hold` runs until JOB_DIR/go appears
(its text, if any, is the adapter name); anything else succeeds at once. SIGTERM cancels (record `cancelled`,
exit 0), as run-job does.
Usage: python fake_ft_worker.py JOB_DIR
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path

from sovereign.formats import JobRecord, utcnow, write_json_atomic

job_dir = Path(sys.argv[1])
stop = False


def on_term(signum, frame) -> None:
    global stop
    stop = True


def event(message: str, type_: str = "message", level: str = "info", **data) -> None:
    line = {"id": f"ftevent-{secrets.token_hex(12)}", "created_at": int(time.time()), "level": level,
            "message": message, "type": type_, "data": data}
    with open(job_dir / "events.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def update(**changes) -> JobRecord:
    record = JobRecord.read(job_dir / "job.json")
    if record.status == "cancelled" and changes.get("status") not in (None, "cancelled"):
        changes.pop("status")
    record = record.model_copy(update=changes)
    record.write(job_dir / "job.json")
    return record


signal.signal(signal.SIGTERM, on_term)
record = update(status="running", started_at=utcnow())
event("Fine-tuning job started", job_id=record.id)
print(f"fake worker {os.getpid()} running {record.id}; serving at "
      f"{os.environ.get('SOVEREIGN_FINETUNE_SERVING_URL')}; offline={os.environ.get('HF_HUB_OFFLINE')}", flush=True)
for step in (2, 4):
    write_json_atomic(job_dir / "checkpoints" / str(step) / "metrics.json",
                      {"step": step, "train_loss": 2.0 / step, "valid_loss": 2.5 / step, "lr": 1e-3})
    event(f"Step {step}: training loss {2.0 / step:.3f}", "metrics", step=step, train_loss=2.0 / step)
if record.suffix == "crash":
    print("fake worker: simulated crash", flush=True)
    os._exit(3)
while record.suffix == "hold" and not (job_dir / "go").exists() and not stop:
    time.sleep(0.05)
if stop:
    update(status="cancelled", finished_at=utcnow())
    event("Fine-tuning job cancelled")
    sys.exit(0)
go = job_dir / "go"
model = (go.read_text().strip() if go.exists() else "") or os.environ.get("FAKE_FT_ADAPTER", "ft@1")
update(status="succeeded", finished_at=utcnow(), fine_tuned_model=model, trained_tokens=1234)
event("The job has successfully completed", fine_tuned_model=model)
