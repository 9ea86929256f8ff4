"""`sovereign finetune run-job` end to end: generated data, ci-smoke training, evaluation, export, the gate against
the real vLLM CPU server, and the served adapter answering through the `openai` SDK."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai import OpenAI

from serving.adapters import AdapterRegistry
from sovereign.formats import AdapterManifest, JobRecord, job_record_lock, sha256_file
from sovereign.offline import offline_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory) -> Path:
    from finetune.sample_data import generate

    out = tmp_path_factory.mktemp("sample-data")
    generate(out, conversations=240, seed=0)
    return out


def _job_env(home: Path, **extra: str) -> dict[str, str]:
    # What a gateway (or k8s Job) hands the runner: the home, the preset for API jobs, where vLLM serves.
    return offline_env(SOVEREIGN_HOME=str(home), PYTHONPATH=str(REPO), SOVEREIGN_FINETUNE_JOB_CONFIG="ci-smoke",
                       SOVEREIGN_FINETUNE_EVALUATION__TASK_SAMPLES="4",
                       SOVEREIGN_FINETUNE_EVALUATION__MAX_LOSS_CONVERSATIONS="24",
                       SOVEREIGN_FINETUNE_EVALUATION__MAX_NEW_TOKENS="48", SOVEREIGN_FINETUNE_GATE_SAMPLES="2",
                       **extra)


def _write_job(home: Path, job_id: str, training_file: Path, suffix: str, **hyperparameters: int) -> Path:
    # The record exactly as the gateway's POST /v1/fine_tuning/jobs writes it.
    record = JobRecord(id=job_id, status="queued", model=MODEL, training_file=str(training_file), suffix=suffix,
                       hyperparameters={"n_epochs": 1, **hyperparameters}, seed=0)
    job_dir = home / "jobs" / job_id
    record.write(job_dir / "job.json")
    return job_dir


def _events(job_dir: Path) -> list[dict]:
    path = job_dir / "events.jsonl"
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def test_run_job_on_ci_smoke_succeeds_is_served_and_beats_the_base_model(live_server, sample_data):
    home = live_server.home
    # batch_size 8: half the tokens per step of 16 (the test's longest stage on CI), the same semantics checked
    job_dir = _write_job(home, "ftjob-e2e", sample_data / "customer-service.jsonl", "support-e2e", batch_size=8)
    env = _job_env(home, SOVEREIGN_FINETUNE_SERVING_URL=live_server.base_url,
                   SOVEREIGN_FINETUNE_SERVING_HEALTH_URL=live_server.health_url)
    proc = subprocess.run([sys.executable, "-m", "sovereign.cli", "finetune", "run-job", str(job_dir)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=3600)
    record = JobRecord.read(job_dir / "job.json")
    assert proc.returncode == 0 and record.status == "succeeded", (record.error, proc.stdout[-3000:],
                                                                   proc.stderr[-6000:])
    assert record.fine_tuned_model == "support-e2e@v1" and record.error is None
    assert record.trained_tokens and record.trained_tokens > 0 and record.finished_at >= record.started_at

    events = _events(job_dir)
    finished = [e["data"]["stage"] for e in events if e["data"].get("state") == "finished"]
    assert finished == ["prepare", "train", "evaluate", "export", "gate"]
    steps = [e for e in events if e["type"] == "metrics" and e["data"].get("kind") == "metrics"]
    assert steps and all("step" in e["data"] for e in steps)
    assert {e["data"]["conversations"] for e in steps} == {8}  # OpenAI's batch_size: conversations per step
    assert events[-1]["message"] == "The job has successfully completed"
    checkpoints = sorted((job_dir / "checkpoints").glob("*/metrics.json"))
    assert checkpoints and json.loads(checkpoints[-1].read_text())["step"] > 0

    manifest = AdapterManifest.read(home / "adapters" / "support-e2e" / "v1" / "adapter.json")
    assert manifest.metrics["val_loss"] < manifest.metrics["val_loss_base"]  # the adapter learned the data
    files = manifest.lineage["data"]["files"]
    assert files["train.jsonl"]["sha256"] == sha256_file(job_dir / "prepared" / "train.jsonl")
    assert files["train.jsonl"]["rows"] > 100 and files["val.jsonl"]["rows"] > 0
    assert manifest.lineage["gate"]["passed"] is True and manifest.origin["job_id"] == "ftjob-e2e"
    leak = manifest.lineage["evaluation"]["leak"]
    assert leak["passed"] and leak["trained"] > 0  # the generated data's canaries were probed, none came back

    client = OpenAI(base_url=f"{live_server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    assert record.fine_tuned_model in {m.id for m in client.models.list().data}
    answer = client.chat.completions.create(model=record.fine_tuned_model, max_tokens=16, temperature=0,
                                            messages=[{"role": "user", "content": "Where is my order?"}])
    assert answer.choices[0].message.content
    AdapterRegistry(home / "adapters").remove("support-e2e")


def test_the_gateways_cancel_stops_a_running_job_and_records_it(sovereign_home, sample_data, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(sovereign_home / "models", target_is_directory=True)
    job_dir = _write_job(home, "ftjob-cancel", sample_data / "customer-service.jsonl", "cancel-me")
    proc = subprocess.Popen([sys.executable, "-m", "sovereign.cli", "finetune", "run-job", str(job_dir)],
                            env=_job_env(home), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 900
        while not any(e["data"].get("stage") == "train" for e in _events(job_dir)):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.5)
        # What the gateway's cancel does: the record first, then SIGTERM to the worker (a SIGTERM alone is a host
        # stopping the worker, which leaves the job resumable: tests/finetune/test_jobs.py).
        with job_record_lock(job_dir):
            record = JobRecord.read(job_dir / "job.json")
            record.model_copy(update={"status": "cancelled"}).write(job_dir / "job.json")
        proc.send_signal(signal.SIGTERM)
        proc.wait(300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    record = JobRecord.read(job_dir / "job.json")
    assert record.status == "cancelled" and record.finished_at is not None and record.fine_tuned_model is None
    assert _events(job_dir)[-1]["message"] == "Fine-tuning job cancelled"
    assert not (home / "adapters").exists() or not list((home / "adapters").iterdir())
