"""Fine-tuning through the gateway, end to end on CPU: the unchanged `openai` SDK uploads a generated
customer-service file, creates a job on the default model (ci-smoke settings), follows its events to `succeeded`,
and chats with `fine_tuned_model` through the gateway. Everything is real: `sovereign gateway` (subprocess), its job
runner starting `sovereign finetune run-job` detached, training, evaluation, export, the consistency gate against the
session's vLLM CPU server, and the supervisor hot-loading the adapter.

    /work/main/.venv/bin/python -m pytest tests/e2e/test_finetune_jobs_e2e.py -q -s
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest

from tests.gateway.conftest import start_gateway_process, write_gateway_config

pytest.importorskip("finetune.jobs", reason="the fine-tune worker (finetune.jobs, run-job) is not merged yet")
pytest.importorskip("finetune.sample_data", reason="the sample-data generator is not merged yet")

pytestmark = [pytest.mark.integration, pytest.mark.slow]
JOB_TIMEOUT_S = 3600


@pytest.fixture(scope="module")
def training_file(tmp_path_factory) -> Path:
    from finetune.sample_data import MAIN_FILE, generate

    out = tmp_path_factory.mktemp("ft-api-data")
    generate(out, conversations=240, seed=0)
    return out / MAIN_FILE  # customer-service.jsonl: the generated conversations, planted PII and duplicates


@pytest.fixture(scope="module")
def ft_gateway(vllm_server):
    """A gateway on the vLLM server's own SOVEREIGN_HOME, so the worker publishes where the supervisor looks."""
    home = vllm_server.home
    run = home / "ft-api-gateway"
    run.mkdir(exist_ok=True)
    config = write_gateway_config(
        run / "gateway.yaml", models={vllm_server.model: [vllm_server.base_url]},
        database_url=f"sqlite:///{run / 'gateway.db'}", health_check_interval_s=30, directory_refresh_s=0.5,
        timeouts={"connect": 5, "ttft": 300, "stall": 120, "total": 600},
        fine_tuning={"preset": "ci-smoke", "max_concurrent_jobs": 1, "poll_interval_s": 1.0, "worker_env": {
            # Where the consistency gate finds the served model; smaller evaluation so CI stays in minutes.
            "SOVEREIGN_FINETUNE_SERVING_URL": vllm_server.base_url,
            "SOVEREIGN_FINETUNE_SERVING_HEALTH_URL": vllm_server.health_url,
            "SOVEREIGN_FINETUNE_EVALUATION__TASK_SAMPLES": "4",
            "SOVEREIGN_FINETUNE_EVALUATION__MAX_LOSS_CONVERSATIONS": "24",
            "SOVEREIGN_FINETUNE_EVALUATION__MAX_NEW_TOKENS": "48",
            "SOVEREIGN_FINETUNE_GATE_SAMPLES": "2"}})
    gw = start_gateway_process(config, home, name="ft-api-gateway")
    yield gw
    gw.stop()


def test_openai_sdk_fine_tunes_the_default_model_and_chats_with_the_adapter(ft_gateway, vllm_server, training_file):
    model = vllm_server.model
    # The team may use the base model only; the adapter its job makes becomes its own.
    client = ft_gateway.client(ft_gateway.make_key("support-team", allowed_models=[model]), timeout=600)

    with open(training_file, "rb") as f:
        uploaded = client.files.create(file=f, purpose="fine-tune")
    assert uploaded.bytes == training_file.stat().st_size and uploaded.purpose == "fine-tune"

    job = client.fine_tuning.jobs.create(model=model, training_file=uploaded.id, suffix="support-api", seed=0,
                                         hyperparameters={"n_epochs": 1})
    assert job.status == "queued" and job.model == model

    seen: set[str] = set()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        for event in reversed(client.fine_tuning.jobs.list_events(job.id, limit=100).data):
            if event.id not in seen:
                seen.add(event.id)
                print(f"[{event.level}] {event.message}", flush=True)
        job = client.fine_tuning.jobs.retrieve(job.id)
        if job.status in ("succeeded", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, "the job did not finish in time"
        time.sleep(5)
    log = ft_gateway.log_tail()
    worker_log = vllm_server.home / "jobs" / job.id / "worker.log"
    assert job.status == "succeeded", (job.error, worker_log.read_text(errors="replace")[-4000:], log)
    assert job.fine_tuned_model and job.fine_tuned_model.startswith("support-api@")
    assert job.trained_tokens and job.trained_tokens > 0

    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    assert events[0].message == "The job has successfully completed"
    assert any(e.type == "metrics" for e in events)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].step_number > 0

    # Lineage: the prepared data the adapter was trained on came from exactly the uploaded bytes.
    sidecar = json.loads((vllm_server.home / "files" / uploaded.id / "file.json").read_text())
    report = json.loads((vllm_server.home / "jobs" / job.id / "prepared" / "prepare_report.json").read_text())
    assert sidecar["sha256"] in json.dumps(report)

    # Callable through the gateway at once, by the team that made it.
    assert job.fine_tuned_model in [m.id for m in client.models.list()]
    reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=32, temperature=0,
                                           messages=[{"role": "user", "content": "Where is my order?"}])
    assert reply.choices[0].message.content.strip()
    # The bare name calls the newest version: apps keep their model name across retraining.
    by_name = client.chat.completions.create(model="support-api", max_tokens=32, temperature=0,
                                             messages=[{"role": "user", "content": "Where is my order?"}])
    assert by_name.model == job.fine_tuned_model
    assert by_name.choices[0].message.content == reply.choices[0].message.content
    other = ft_gateway.client(ft_gateway.make_key("other-team", allowed_models=[model]), timeout=60)
    for name in (job.fine_tuned_model, "support-api"):
        with pytest.raises(openai.PermissionDeniedError):
            other.chat.completions.create(model=name, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
