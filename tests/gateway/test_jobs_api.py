"""/v1/files and /v1/fine_tuning/jobs through the real `openai` SDK against a real `sovereign gateway` process.

The jobs run as real detached worker processes started by the gateway's runner; the worker here is
tests/gateway/fake_ft_worker.py, which writes the job folder exactly as `sovereign finetune run-job` does but in a
second (the real worker is exercised end to end in tests/e2e/test_finetune_jobs_e2e.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from gateway.config import GatewayConfig
from gateway.directory import KeyEntry, TeamPolicy
from gateway.fine_tuning import FineTuning
from sovereign.settings import HomeSettings
from tests.gateway.conftest import start_gateway_process, wait_for, write_gateway_config
from tests.gateway.fake_upstream import FakeUpstream, ThreadServer

WORKER = Path(__file__).with_name("fake_ft_worker.py")
ROWS = [{"messages": [{"role": "user", "content": f"Where is order {i}?"},
                      {"role": "assistant", "content": f"Order {i} ships tomorrow."}]} for i in range(20)]
DATA = ("\n".join(json.dumps(r) for r in ROWS) + "\n").encode()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2] != "Z"


@pytest.fixture(scope="module")
def ft_upstream():
    fake = FakeUpstream(model="fake-model", adapters=["support@1"])
    with ThreadServer(fake) as server:
        fake.url = server.url
        yield fake


def ft_config(home: Path, upstream_url: str, **fine_tuning) -> Path:
    ft = {"worker_command": [sys.executable, str(WORKER)], "worker_env": {"FAKE_FT_ADAPTER": "support@1"},
          "poll_interval_s": 0.2, "max_concurrent_jobs": 1, "max_file_bytes": 100_000, **fine_tuning}
    # Health checks far apart: a new adapter must become visible because a job succeeded, not by the next poll.
    return write_gateway_config(home / "gateway.yaml", models={"fake-model": [upstream_url]},
                                database_url=f"sqlite:///{home / 'gateway.db'}", health_check_interval_s=300,
                                directory_refresh_s=0.2, access_log=False, fine_tuning=ft)


@pytest.fixture(scope="module")
def ft_gateway(ft_upstream, tmp_path_factory):
    home = tmp_path_factory.mktemp("ft-gateway")
    gw = start_gateway_process(ft_config(home, ft_upstream.url), home, name="ft-gateway")
    gw.home = home
    yield gw
    gw.stop()
    for claim in home.glob("jobs/*/worker.json"):  # no worker outlives the test
        pid = json.loads(claim.read_text() or "{}").get("pid")
        if pid and pid_alive(pid):
            os.killpg(pid, signal.SIGKILL)


_n = 0


def team_client(gw, allowed=("fake-model",)):
    global _n
    _n += 1
    return gw.client(gw.make_key(f"team{_n}", allowed_models=list(allowed)), timeout=30)


def upload(client, data: bytes = DATA, name: str = "train.jsonl"):
    return client.files.create(file=(name, data), purpose="fine-tune")


def finished(client, job_id: str, timeout: float = 30.0):
    return wait_for(f"{job_id} to finish", lambda: (lambda j: j if j.status in ("succeeded", "failed", "cancelled")
                                                     else None)(client.fine_tuning.jobs.retrieve(job_id)), timeout)


# ------------------------------------------------------------------------------------------------------- files
def test_upload_list_retrieve_content_delete_round_trip(ft_gateway):
    client = team_client(ft_gateway)
    f = upload(client)
    assert f.object == "file" and f.id.startswith("file-")
    assert (f.bytes, f.filename, f.purpose) == (len(DATA), "train.jsonl", "fine-tune")
    assert client.files.retrieve(f.id) == f
    assert [x.id for x in client.files.list()] == [f.id]
    assert [x.id for x in client.files.list(purpose="fine-tune")] == [f.id]
    assert client.files.content(f.id).read() == DATA

    sidecar = json.loads((ft_gateway.home / "files" / f.id / "file.json").read_text())
    assert sidecar["owner"].startswith("team") and len(sidecar["sha256"]) == 64 and sidecar["rows"] == 20
    assert (ft_gateway.home / "files" / f.id / "data.jsonl").read_bytes() == DATA

    g = upload(client, name="more.jsonl")
    page = client.files.list(limit=1)
    assert [x.id for x in page.data] == [g.id] and page.has_more
    assert [x.id for x in client.files.list(limit=1, after=g.id).data] == [f.id]
    assert [x.id for x in client.files.list()] == [g.id, f.id]  # auto-pagination over all pages too

    deleted = client.files.delete(f.id)
    assert deleted.deleted and deleted.id == f.id
    with pytest.raises(openai.NotFoundError) as exc:
        client.files.retrieve(f.id)
    assert exc.value.code == "file_not_found"
    assert not (ft_gateway.home / "files" / f.id).exists()


def test_uploads_that_are_refused_say_why_and_leave_nothing(ft_gateway):
    client = team_client(ft_gateway)
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("train.jsonl", DATA), purpose="batch")
    assert exc.value.code == "invalid_purpose" and exc.value.param == "purpose"

    broken = DATA + b'{"messages": [\n' + b"[1, 2]\n"
    with pytest.raises(openai.BadRequestError) as exc:
        upload(client, broken)
    assert exc.value.code == "invalid_file_format"
    assert "line 21: not valid JSON" in exc.value.message and "line 22: expected a JSON object" in exc.value.message

    with pytest.raises(openai.BadRequestError) as exc:
        upload(client, b"\xff\xfe not text\n")
    assert "line 1: not UTF-8" in exc.value.message

    with pytest.raises(openai.BadRequestError) as exc:
        upload(client, b"\n\n")
    assert exc.value.code == "invalid_file_format"

    with pytest.raises(openai.APIStatusError) as exc:
        upload(client, DATA * 200)  # over the 100 kB limit configured
    assert exc.value.status_code == 413 and exc.value.code == "file_too_large"

    with pytest.raises(openai.AuthenticationError):
        ft_gateway.client("sk-not-a-key").files.list()
    assert client.files.list().data == []
    assert not [p for p in (ft_gateway.home / "files").iterdir() if p.name.startswith(".")]


def test_a_team_sees_only_its_own_files(ft_gateway):
    a, b = team_client(ft_gateway), team_client(ft_gateway)
    f = upload(a)
    assert b.files.list().data == []
    for call in (b.files.retrieve, b.files.content, b.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(f.id)
    assert a.files.retrieve(f.id).id == f.id


# --------------------------------------------------------------------------------------------------- job errors
def test_job_create_refusals_are_openai_errors(ft_gateway):
    client = team_client(ft_gateway)
    f = upload(client)
    jobs = client.fine_tuning.jobs

    with pytest.raises(openai.BadRequestError) as exc:
        jobs.create(model="gpt-4o-mini", training_file=f.id)
    assert (exc.value.code, exc.value.param) == ("model_not_available", "model")
    assert "fake-model" in exc.value.message

    with pytest.raises(openai.BadRequestError) as exc:
        jobs.create(model="support@1", training_file=f.id)  # an adapter is not a base model
    assert exc.value.code == "model_not_available"

    other = team_client(ft_gateway, allowed=("something-else",))
    g = upload(other)
    with pytest.raises(openai.PermissionDeniedError) as exc:
        other.fine_tuning.jobs.create(model="fake-model", training_file=g.id)
    assert exc.value.code == "model_not_allowed"

    with pytest.raises(openai.BadRequestError) as exc:
        jobs.create(model="fake-model", training_file=g.id)  # another team's file
    assert (exc.value.code, exc.value.param) == ("invalid_file", "training_file")

    with pytest.raises(openai.BadRequestError) as exc:
        jobs.create(model="fake-model", training_file=f.id, validation_file="file-missing")
    assert exc.value.param == "validation_file"

    with pytest.raises(openai.BadRequestError) as exc:
        jobs.create(model="fake-model", training_file=f.id, hyperparameters={"n_epochs": 0})
    assert exc.value.param == "hyperparameters.n_epochs"

    with pytest.raises(openai.BadRequestError) as exc:
        jobs.create(model="fake-model", training_file=f.id, method={"type": "dpo"})
    assert exc.value.code == "unsupported_method"

    with pytest.raises(openai.BadRequestError) as exc:
        jobs.create(model="fake-model", training_file=f.id, suffix="no spaces please")
    assert exc.value.param == "suffix"

    with pytest.raises(openai.NotFoundError) as exc:
        jobs.retrieve("ftjob-doesnotexist")
    assert exc.value.code == "fine_tuning_job_not_found"
    assert jobs.list().data == []


def test_malformed_requests_are_openai_errors_not_500s(ft_gateway):
    client = team_client(ft_gateway)
    f = upload(client)
    jobs = client.fine_tuning.jobs

    with pytest.raises(openai.BadRequestError) as exc:
        upload(client, DATA + b"[" * 30000 + b"]" * 30000 + b"\n")  # past Python's recursion limit
    assert exc.value.code == "invalid_file_format" and "line 21: JSON nested too deeply" in exc.value.message

    for call in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError) as exc:
            call("file-\x00")
        assert exc.value.code == "file_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        jobs.create(model="fake-model", training_file="file-\x00")
    assert (exc.value.code, exc.value.param) == ("invalid_file", "training_file")

    for method, param in (({"type": "supervised", "supervised": "x"}, "method.supervised"),
                          ({"type": "supervised", "supervised": {"hyperparameters": [1]}},
                           "method.supervised.hyperparameters"),
                          ({"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 99}}},
                           "method.supervised.hyperparameters.n_epochs")):
        with pytest.raises(openai.BadRequestError) as exc:
            jobs.create(model="fake-model", training_file=f.id, method=method)
        assert exc.value.param == param, method

    with pytest.raises(openai.BadRequestError) as exc:
        jobs.create(model="fake-model", training_file=f.id, hyperparameters={"n_epochs": 2.5})
    assert exc.value.param == "hyperparameters.n_epochs"  # not pydantic's "hyperparameters.n_epochs.constrained-int"
    assert "or 'auto'" in exc.value.message

    with pytest.raises(openai.BadRequestError) as exc:
        jobs.create(model="fake-model", training_file=f.id, metadata={str(i): "x" * 512 for i in range(17)})
    assert exc.value.param == "metadata"  # OpenAI's limits: 16 pairs, keys of 64 characters, values of 512
    with pytest.raises(openai.APIStatusError) as exc:
        jobs.create(model="fake-model", training_file=f.id, metadata={"note": "x" * (2 << 20)})
    assert exc.value.status_code == 413 and (exc.value.code, exc.value.param) == ("request_too_large", None)

    key = client.api_key
    with httpx.Client(base_url=ft_gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        r = http.post("/v1/fine_tuning/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] is None
    assert r.json()["error"]["message"].startswith("The request body is not valid JSON")
    assert jobs.list().data == []


def test_jobs_list_filters_by_metadata_as_the_sdk_sends_it(ft_gateway):
    client = team_client(ft_gateway)
    f = upload(client)
    jobs = client.fine_tuning.jobs
    made = {name: jobs.create(model="fake-model", training_file=f.id, suffix="hold", metadata=meta)
            for name, meta in (("a", {"project": "crm", "stage": "dev"}), ("b", {"project": "crm"}), ("c", None))}
    for job in made.values():
        jobs.cancel(job.id)

    def ids(**kwargs) -> set[str]:
        return {j.id for j in jobs.list(limit=100, **kwargs).data}

    assert ids(metadata={"project": "crm"}) == {made["a"].id, made["b"].id}
    assert ids(metadata={"project": "crm", "stage": "dev"}) == {made["a"].id}
    assert ids(metadata={"project": "other"}) == set()
    assert ids() == {j.id for j in made.values()}
    assert ids(extra_query={"metadata": "null"}) == {made["c"].id}


def test_auto_hyperparameters_leave_the_presets_values(ft_gateway):
    client = team_client(ft_gateway)
    f = upload(client)
    jobs = client.fine_tuning.jobs
    auto = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
    for kwargs, chosen in (({"hyperparameters": auto}, {}),
                           ({"method": {"type": "supervised",
                                        "supervised": {"hyperparameters": {**auto, "batch_size": 8}}}},
                            {"batch_size": 8})):
        job = jobs.create(model="fake-model", training_file=f.id, suffix="hold", **kwargs)
        jobs.cancel(job.id)
        assert (job.hyperparameters.n_epochs, job.hyperparameters.learning_rate_multiplier) == ("auto", "auto")
        assert job.hyperparameters.batch_size == chosen.get("batch_size", "auto")
        # Left out of the record: the worker takes the preset's value for whatever is not there.
        record = json.loads((ft_gateway.home / "jobs" / job.id / "job.json").read_text())
        assert record["hyperparameters"] == chosen
        finished(client, job.id)


# --------------------------------------------------------------------------------------------------- job runs
def test_job_runs_to_succeeded_and_its_adapter_is_callable_by_its_team_only(ft_gateway, ft_upstream):
    client = team_client(ft_gateway)
    outsider = team_client(ft_gateway)
    f = upload(client)
    # The team may use the base model only: the adapter is not theirs yet.
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="support@1", messages=[{"role": "user", "content": "hi"}])

    job = client.fine_tuning.jobs.create(model="fake-model", training_file=f.id, suffix="support", seed=7,
                                         hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 0.5})
    assert job.object == "fine_tuning.job" and job.id.startswith("ftjob-")
    assert job.status == "queued" and job.seed == 7 and job.training_file == f.id
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == "auto"
    with pytest.raises(openai.APIStatusError) as exc:
        client.files.delete(f.id)  # its data is in use until the job finishes
    assert exc.value.status_code == 409 or client.fine_tuning.jobs.retrieve(job.id).status == "succeeded"

    done = finished(client, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "support@1" and done.trained_tokens == 1234
    assert done.finished_at >= done.created_at

    record = json.loads((ft_gateway.home / "jobs" / job.id / "job.json").read_text())
    assert record["owner"] == done.organization_id.removeprefix("org-") and record["runner"] == "local"
    assert record["team_pii"] == "off"  # the team's policy, which the worker applies to the data
    worker_log = (ft_gateway.home / "jobs" / job.id / "worker.log").read_text()
    # Offline env, and the gate pointed at a replica of the job's base model.
    assert f"serving at {ft_upstream.url}; offline=1" in worker_log

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].message == "The job has successfully completed"
    assert events[-1].message == f"Created fine-tuning job: {job.id}"
    assert {e.object for e in events} == {"fine_tuning.job.event"}
    assert any(e.type == "metrics" and e.data["step"] == 4 for e in events)
    first = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert [e.id for e in first.data] == [e.id for e in events[:2]] and first.has_more
    after = client.fine_tuning.jobs.list_events(job.id, limit=2, after=events[1].id)
    assert [e.id for e in after.data] == [e.id for e in events[2:4]]

    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in ckpts] == [4, 2]
    assert ckpts[0].metrics.train_loss == 0.5 and ckpts[0].fine_tuning_job_id == job.id
    assert ckpts[0].fine_tuned_model_checkpoint == "support@1:ckpt-step-4"

    listed = client.fine_tuning.jobs.list()
    assert [j.id for j in listed.data] == [job.id] and listed.data[0].status == "succeeded"
    assert outsider.fine_tuning.jobs.list().data == []
    with pytest.raises(openai.NotFoundError):
        outsider.fine_tuning.jobs.retrieve(job.id)

    # Now the adapter is the team's: callable and listed, for them and nobody else.
    reply = client.chat.completions.create(model="support@1", messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content
    assert "support@1" in [m.id for m in client.models.list()]
    with pytest.raises(openai.PermissionDeniedError):
        outsider.chat.completions.create(model="support@1", messages=[{"role": "user", "content": "hi"}])
    # A catch-all policy does not reach another team's adapter (it may give away its training data); naming it does.
    everything = team_client(ft_gateway, allowed=("*",))
    with pytest.raises(openai.PermissionDeniedError) as exc:
        everything.chat.completions.create(model="support@1", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.code == "model_not_allowed" and "fine-tuned adapter of team" in exc.value.message
    listed_ids = [m.id for m in everything.models.list()]
    assert "fake-model" in listed_ids and "support@1" not in listed_ids
    granted = team_client(ft_gateway, allowed=("fake-model", "support@*"))
    assert granted.chat.completions.create(model="support@1", messages=[{"role": "user", "content": "hi"}]).choices
    assert client.files.delete(f.id).deleted  # finished: the data may go


def test_jobs_wait_for_a_free_slot_and_cancel_stops_the_worker(ft_gateway):
    client = team_client(ft_gateway)
    f = upload(client)
    jobs = client.fine_tuning.jobs
    first = jobs.create(model="fake-model", training_file=f.id, suffix="hold")
    second = jobs.create(model="fake-model", training_file=f.id, suffix="hold")
    wait_for("first job running", lambda: jobs.retrieve(first.id).status == "running")
    claim = ft_gateway.home / "jobs" / first.id / "worker.json"
    pid = json.loads(claim.read_text())["pid"]
    assert pid_alive(pid)
    for _ in range(5):  # max_concurrent_jobs is 1: the second waits however often the runner looks
        time.sleep(0.3)
        assert jobs.retrieve(second.id).status == "queued"
    assert [j.id for j in jobs.list(limit=1).data] == [second.id]
    assert [j.id for j in jobs.list(limit=1, after=second.id).data] == [first.id]

    cancelled = jobs.cancel(first.id)
    assert cancelled.status == "cancelled"
    wait_for("the worker to exit on SIGTERM", lambda: not pid_alive(pid))
    assert jobs.retrieve(first.id).status == "cancelled"
    assert jobs.list_events(first.id).data[0].message == "Fine-tuning job cancelled"

    wait_for("second job running", lambda: jobs.retrieve(second.id).status == "running")
    assert jobs.cancel(second.id).status == "cancelled"
    assert finished(client, second.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError) as exc:
        jobs.cancel(second.id)
    assert exc.value.code == "job_not_cancellable"


def test_a_job_whose_worker_dies_is_marked_failed_with_the_reason(ft_gateway):
    client = team_client(ft_gateway)
    f = upload(client)
    job = client.fine_tuning.jobs.create(model="fake-model", training_file=f.id, suffix="crash")
    done = finished(client, job.id)
    assert done.status == "failed" and done.error.code == "worker_died"
    assert "exited with code 3" in done.error.message and "simulated crash" in done.error.message
    assert client.fine_tuning.jobs.list_events(job.id).data[0].level == "error"


def test_a_new_adapter_is_routable_as_soon_as_its_job_succeeds(ft_gateway, ft_upstream):
    client = team_client(ft_gateway, allowed=("*",))
    f = upload(client)
    job = client.fine_tuning.jobs.create(model="fake-model", training_file=f.id, suffix="hold")
    wait_for("job running", lambda: client.fine_tuning.jobs.retrieve(job.id).status == "running")
    ft_upstream.adapters.append("fresh@1")  # "vLLM loaded it" (the real worker's gate loads it before success)
    assert "fresh@1" not in [m.id for m in client.models.list()]  # the next health poll is minutes away
    (ft_gateway.home / "jobs" / job.id / "go").write_text("fresh@1")
    assert finished(client, job.id).fine_tuned_model == "fresh@1"
    wait_for("fresh@1 in /v1/models", lambda: "fresh@1" in [m.id for m in client.models.list()], timeout=10)


def test_gateway_restart_fails_a_job_whose_worker_died_meanwhile(ft_upstream, tmp_path):
    config = ft_config(tmp_path, ft_upstream.url)
    gw = start_gateway_process(config, tmp_path, name="ft-restart")
    try:
        client = gw.client(gw.make_key("restart", allowed_models=["fake-model"]), timeout=30)
        f = upload(client)
        job = client.fine_tuning.jobs.create(model="fake-model", training_file=f.id, suffix="hold")
        wait_for("job running", lambda: client.fine_tuning.jobs.retrieve(job.id).status == "running")
        pid = json.loads((tmp_path / "jobs" / job.id / "worker.json").read_text())["pid"]
        gw.stop()
        assert pid_alive(pid)  # detached: a gateway restart does not take running jobs down
        os.killpg(pid, signal.SIGKILL)
        wait_for("worker gone", lambda: not pid_alive(pid))
        gw = start_gateway_process(config, tmp_path, name="ft-restart")
        client = gw.client(gw.make_key("restart"), timeout=30)
        done = finished(client, job.id)
        assert done.status == "failed" and done.error.code == "worker_died"
        assert "no longer running" in done.error.message
    finally:
        gw.stop()


# ----------------------------------------------------------------------------------------------------- in-process
# What a client on a socket cannot see: how much of a body the app read before answering, what it logged, what a
# start-up leaves in the files folder.
class OneKey:
    """The directory as the fine-tuning app reads it, with one live key: `sk-live`."""

    def __init__(self) -> None:
        team = TeamPolicy(name="inproc", allowed_models=("fake-model",), max_tokens=None, pii="off",
                          injection="off", audit_content="off", limits=(None,) * 4)
        self.entry = KeyEntry(id="k1", secret_hash="", team=team, is_admin=False, limits=(None,) * 4)

    def lookup(self, secret: str) -> KeyEntry | None:
        return self.entry if secret == "sk-live" else None

    def refusal(self, secret: str | None):
        from gateway import errors

        return errors.invalid_api_key()


@pytest.fixture
def ft_app(tmp_path):
    config = GatewayConfig(models={"fake-model": ["http://127.0.0.1:9"]},
                           fine_tuning={"worker_command": [sys.executable, str(WORKER)], "max_file_bytes": 100_000})
    return FineTuning(config, OneKey(), lambda: ["fake-model"], home=HomeSettings(home=tmp_path))


def chunked_upload(ft: FineTuning, headers: dict[str, str], lines: int = 50) -> tuple[httpx.Response, int]:
    """A multipart upload sent chunked (no Content-Length), 64 KiB a line; the response and the bytes the app read."""
    line = b'{"a": "' + b"x" * (1 << 16) + b'"}\n'
    parts = [b'--XX\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n--XX\r\n'
             b'Content-Disposition: form-data; name="file"; filename="t.jsonl"\r\n\r\n', *[line] * lines,
             b"\r\n--XX--\r\n"]
    read = 0

    async def body():
        nonlocal read
        for part in parts:
            read += len(part)
            yield part

    async def post() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=ft.app), base_url="http://ft") as http:
            return await http.post("/v1/files", content=body(),
                                   headers={"content-type": "multipart/form-data; boundary=XX", **headers})

    return asyncio.run(post()), read


def test_a_chunked_upload_is_refused_as_soon_as_it_is_unauthorized_or_too_large(ft_app):
    response, read = chunked_upload(ft_app, {})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert read < 100_000  # refused on its headers, not after 3 MB

    response, read = chunked_upload(ft_app, {"authorization": "Bearer sk-live"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "file_too_large"
    assert read < 100_000 + (3 << 16) + 1000  # the limit, the multipart envelope, and the line that passed it
    assert not list(ft_app.files.root.glob("*"))

    response, _ = chunked_upload(ft_app, {"authorization": "Bearer sk-live"}, lines=1)
    assert response.status_code == 200 and response.json()["bytes"] == (1 << 16) + 10


def test_an_unexpected_error_is_a_logged_json_500(ft_app, monkeypatch, caplog):
    def broken(owner: str):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ft_app.files, "iter_owned", broken)
    client = TestClient(ft_app.app, headers={"Authorization": "Bearer sk-live"})
    with caplog.at_level(logging.ERROR):
        response = client.get("/v1/files")
    assert response.status_code == 500
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "internal_error") and "fire" not in error["message"]
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.exc_info and "disk on fire" in caplog.text and record.path == "/v1/files"


def test_start_sweeps_what_killed_uploads_and_deletes_left(ft_app):
    root = ft_app.files.root
    names = (".tmp-file-stale", ".tmp-file-growing", ".tmp-file-fresh", ".deleted-file-x-0a1b")
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "data.jsonl").write_bytes(DATA)
    old = time.time() - 2 * 3600
    for path in (root / names[0], root / names[0] / "data.jsonl", root / names[1]):
        os.utime(path, (old, old))
    # Another replica's upload: its folder is old but its data still grows, so it stays.

    async def start_and_stop() -> None:
        await ft_app.start()
        await ft_app.stop()

    asyncio.run(start_and_stop())
    assert sorted(p.name for p in root.iterdir()) == [".tmp-file-fresh", ".tmp-file-growing"]
