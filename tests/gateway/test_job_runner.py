"""The fine-tune job runner on its own: who owns an adapter whatever its job's status, cancels that do not overwrite a
finished job, slots held by workers still starting or stopping (several gateways share the jobs folder), start-up
without probing old adapters, reaped local workers. Workers are a stub launcher, the fake worker of the jobs API
tests, or finetune's run-job record keeping with a stand-in pipeline.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from finetune import jobs as worker_jobs
from finetune.errors import FinetuneError
from finetune.export import ExportRefused
from gateway.finetune_config import FineTuningConfig
from gateway.job_runner import CLAIM, CONTESTED, WITHDRAWN, JobRunner, LocalLauncher, WorkerState
from gateway.job_store import JobStore, new_job_id
from serving.adapters import RegisteredAdapter
from sovereign.formats import ADAPTER_MANIFEST, AdapterManifest, JobRecord, job_record_lock
from sovereign.settings import HomeSettings
from tests.gateway.test_jobs_api import WORKER, wait_for


class StubLauncher:
    """Workers that live until `finish(job_id)`; records what was launched and stopped."""

    def __init__(self) -> None:
        self.launched: list[str] = []
        self.stopped: list[tuple[str, bool]] = []
        self.alive: set[str] = set()

    def launch(self, record: JobRecord, job_dir: Path) -> dict[str, Any]:
        self.launched.append(record.id)
        self.alive.add(record.id)
        return {"runner": "stub", "job": record.id}

    def state(self, record: JobRecord, job_dir: Path, claim: dict[str, Any]) -> WorkerState:
        return WorkerState(claim.get("job") in self.alive, "the stub worker is gone")

    def stop(self, record: JobRecord, job_dir: Path, claim: dict[str, Any], *, force: bool = False) -> None:
        self.stopped.append((record.id, force))

    def reap(self) -> None:
        pass

    def finish(self, job_id: str) -> None:
        self.alive.discard(job_id)


def add_job(store: JobStore, *, owner: str = "a", status: str = "queued", **fields) -> JobRecord:
    record = JobRecord(id=new_job_id(), status=status, model="fake-model", training_file="file-x", owner=owner,
                       runner="local", **fields)
    store.job_dir(record.id).mkdir(parents=True)
    store.write(record)
    time.sleep(0.002)  # created_at orders the queue
    return record


def stub_runner(tmp_path: Path, slots: int = 1, **kw) -> tuple[JobRunner, JobStore, StubLauncher]:
    store = JobStore(tmp_path / "jobs")
    store.root.mkdir(exist_ok=True)
    launcher = StubLauncher()
    return JobRunner(FineTuningConfig(max_concurrent_jobs=slots), store, launcher, **kw), store, launcher


# ----------------------------------------------------------------------------------------- owners (fix 1)
@pytest.mark.parametrize("status", ["cancelled", "failed", "running"])
def test_an_adapter_a_job_names_is_its_teams_while_it_runs_and_nobodys_once_it_did_not_succeed(tmp_path, status):
    runner, store, _ = stub_runner(tmp_path)
    # A cancel that landed after the worker published (during the gate), or the name the worker wrote before
    # publishing while the job still runs: either way a replica may serve the adapter, and no other team may call it.
    named = add_job(store, status=status, fine_tuned_model="secret@v1")
    running = add_job(store, owner="b", status="running", adapter="other@v1")
    runner.scan()
    assert runner.owners["secret@v1"] == ("a" if status == "running" else WITHDRAWN)
    assert runner.owners["other@v1"] == "b"
    assert store.read(named.id).status == status


def test_a_gateway_without_the_registry_withdraws_a_failed_jobs_adapter_and_says_so_once(tmp_path):
    """Kubernetes: the gateway has no write access to the registry, so the adapter stays there (and on the replicas);
    nobody may call it through the gateway, and the job's events say who can remove it."""
    runner, store, _ = stub_runner(tmp_path)  # adapters_dir None, as fine_tuning.py makes it for runner: kubernetes
    failed = add_job(store, owner="a", status="failed", adapter="s@v3")
    runner.scan()
    assert runner.owners["s@v3"] == WITHDRAWN
    again, _, _ = stub_runner(tmp_path)  # a restarted gateway, or another replica
    again.scan()
    notes = [e["message"] for e in store.events(failed.id) if "withdrawn" in e["message"]]
    assert len(notes) == 1 and "sovereign adapters remove s@v3" in notes[0]
    # Removed by an operator, the version is published anew by a job that succeeded: that job's team owns it.
    add_job(store, owner="b", status="succeeded", fine_tuned_model="s@v3", adapter="s@v3")
    again.scan()
    assert again.owners["s@v3"] == "b"


def test_a_removed_adapters_name_yields_to_a_published_one_and_rival_teams_get_no_owner(tmp_path):
    runner, store, _ = stub_runner(tmp_path)
    add_job(store, owner="a", status="cancelled", adapter="s@v2", adapter_removed_at=1)
    add_job(store, owner="b", status="succeeded", fine_tuned_model="s@v2", adapter="s@v2")
    add_job(store, owner="a", status="running", adapter="t@v1")
    add_job(store, owner="b", status="running", adapter="t@v1")
    runner.scan()
    assert runner.owners["s@v2"] == "b"  # the version was free again after team a's job removed its adapter
    assert runner.owners["t@v1"] == CONTESTED  # no team's: only an explicit grant reaches it


def test_cancel_does_not_overwrite_a_status_the_worker_wrote_meanwhile(tmp_path):
    runner, store, _ = stub_runner(tmp_path)
    record = add_job(store, status="running")
    job_dir = store.job_dir(record.id)
    with ThreadPoolExecutor(1) as pool:
        with job_record_lock(job_dir):  # the worker is writing its final status
            cancel = pool.submit(runner.cancel, record.id)
            time.sleep(0.3)
            assert not cancel.done()
            record.model_copy(update={"status": "succeeded", "fine_tuned_model": "ok@v1"}).write(job_dir / "job.json")
        assert cancel.result(timeout=5) is None
    final = store.read(record.id)
    assert final.status == "succeeded" and final.fine_tuned_model == "ok@v1"


# ------------------------------------------------------------------- the worker removes what it published
def _stand_in_registry(home: HomeSettings, name: str, version: str) -> RegisteredAdapter:
    manifest = AdapterManifest(name=name, version=version, base_model="fake-model", base_manifest_sha256="0" * 64,
                               rank=8, origin={"kind": "finetune_job"})
    path = home.adapters_dir / name / version
    manifest.write(path / ADAPTER_MANIFEST)
    return RegisteredAdapter(path, manifest)


@pytest.fixture
def worker(tmp_path, monkeypatch):
    """finetune's run-job on a gateway record, its pipeline replaced by `worker.steps(pipeline)`."""
    home = HomeSettings(home=tmp_path)
    store = JobStore(home.jobs_dir)
    record = add_job(store, suffix="secret")
    gateway = JobRunner(FineTuningConfig(), store, StubLauncher())
    env = SimpleNamespace(home=home, store=store, record=record, gateway=gateway, steps=None)
    monkeypatch.setattr(worker_jobs, "config_for_job", lambda *a: SimpleNamespace(name="secret"))

    def run(pipeline: worker_jobs.Pipeline):
        pipeline.claim_adapter("secret@v1")
        pipeline.published = _stand_in_registry(home, "secret", "v1")
        return env.steps(pipeline)

    monkeypatch.setattr(worker_jobs.Pipeline, "run", run)
    env.run = lambda: worker_jobs.JobRunner(store.job_dir(record.id), home=home).run()
    return env


def _result() -> worker_jobs.PipelineResult:
    return worker_jobs.PipelineResult(served_name="secret@v1", adapter_path=Path("."), trained_tokens=1, best_step=1,
                                      train_metrics={}, evaluation=None, gate=None, prepared_dir=Path("."))


def _cancel_in_gate(w):
    def steps(pipeline):
        assert w.gateway.cancel(w.record.id).status == "cancelled"
        pipeline.check_cancel()  # where the gate would notice it (or SIGTERM would land)
    return steps


def _cancel_after_gate(w):
    def steps(pipeline):
        assert w.gateway.cancel(w.record.id).status == "cancelled"
        return _result()
    return steps


def _fail_after_publish(w):
    def steps(pipeline):
        raise FinetuneError("the gate's replica went away", code="gate_unreachable")
    return steps


@pytest.mark.parametrize("outcome, status", [(_cancel_in_gate, "cancelled"), (_cancel_after_gate, "cancelled"),
                                             (_fail_after_publish, "failed")])
def test_a_job_that_does_not_succeed_removes_the_adapter_it_published(worker, outcome, status):
    worker.steps = outcome(worker)
    final = worker.run()
    assert final.status == status and worker.store.read(worker.record.id).status == status
    assert not (worker.home.adapters_dir / "secret" / "v1").exists()  # nothing left for a replica to load
    extra = final.model_extra
    assert extra["adapter"] == "secret@v1" and extra["adapter_removed_at"]
    worker.gateway.scan()  # replicas may serve it until their next registry poll: it stays the team's meanwhile
    assert worker.gateway.owners["secret@v1"] == "a"


def test_the_worker_names_the_adapter_on_the_record_before_publishing_it(tmp_path, monkeypatch):
    home = HomeSettings(home=tmp_path)
    store = JobStore(home.jobs_dir)
    record = add_job(store)
    job_dir = store.job_dir(record.id)
    _stand_in_registry(home, "secret", "v1")
    calls = []

    def export_adapter(adapter_dir, *, name, version, **kw):
        calls.append((version, store.read(record.id).model_extra.get("adapter")))
        if len(calls) == 1:  # another job published this version meanwhile
            _stand_in_registry(home, name, version)
            raise ExportRefused(f"adapter {name}@{version} is already published")
        return _stand_in_registry(home, name, version)

    monkeypatch.setattr("finetune.export.export_adapter", export_adapter)
    runner = worker_jobs.JobRunner(job_dir, home=home)
    pipeline = worker_jobs.Pipeline(SimpleNamespace(name="secret", model="fake-model", training=SimpleNamespace(
        seed=0), model_dump=lambda **kw: {}, serving_profile="cpu"), job_dir, settings=runner.settings, home=home,
        emit=runner.emit, origin={}, claim_adapter=lambda served: runner._update(adapter=served))
    report = SimpleNamespace(metrics=lambda: {}, model_dump=lambda **kw: {})
    trained = SimpleNamespace(adapter_dir=tmp_path, best_step=1, trained_tokens=1, metrics={})
    adapter = pipeline.export(tmp_path, trained, report)
    assert calls == [("v2", "secret@v2"), ("v3", "secret@v3")]
    assert adapter.served_name == "secret@v3" and pipeline.published is adapter
    assert store.read(record.id).model_extra["adapter"] == "secret@v3"


# ------------------------------------------------------------------ several gateways: starting (fix 2)
def test_a_worker_another_gateway_is_starting_keeps_its_slot_until_the_claim_is_stale(tmp_path):
    runner, store, launcher = stub_runner(tmp_path)
    first = add_job(store)
    second = add_job(store)
    (store.job_dir(first.id) / CLAIM).touch()  # another gateway took it and is inside launcher.launch()
    runner.scan()
    assert store.read(first.id).status == "queued"  # not failed as "never started"
    assert launcher.launched == []  # and it holds the only slot
    old = time.time() - 11 * 60  # that gateway died mid-launch long ago: the job is recovered
    os.utime(store.job_dir(first.id) / CLAIM, (old, old))
    runner.scan()
    failed = store.read(first.id)
    assert failed.status == "failed" and failed.error["code"] == "worker_died"
    assert launcher.launched == [second.id]


# ----------------------------------------------------------------------- cancelled, still stopping (fix 3)
def test_a_cancelled_jobs_worker_holds_its_slot_until_it_is_gone_on_every_gateway(tmp_path):
    runner, store, launcher = stub_runner(tmp_path)
    first = add_job(store)
    second = add_job(store)
    runner.scan()
    assert launcher.launched == [first.id]
    other = JobRunner(runner.config, store, launcher)  # a second gateway, which did not send the cancel
    assert runner.cancel(first.id).status == "cancelled" and launcher.stopped == [(first.id, False)]
    for gateway in (runner, other, runner):
        gateway.scan()
        assert launcher.launched == [first.id]  # the first worker still frees the GPU
    launcher.finish(first.id)
    other.scan()
    assert launcher.launched == [first.id, second.id]


def test_a_worker_that_outlives_the_cancel_grace_is_killed(tmp_path):
    runner, store, launcher = stub_runner(tmp_path)
    record = add_job(store)
    runner.scan()
    runner.cancel(record.id)
    runner.scan()
    assert (record.id, True) not in launcher.stopped
    cancelled = store.read(record.id)
    store.write(cancelled.model_copy(update={"cancel_requested_at": int(time.time()) - 60}))
    runner.scan()
    assert (record.id, True) in launcher.stopped


# --------------------------------------------------------------------------------- start-up (fix 4)
def test_start_takes_in_old_jobs_without_probing_and_discovery_does_not_hold_the_lock(tmp_path):
    async def main():
        probed: list[str] = []
        release = asyncio.Event()

        async def discover(record: JobRecord) -> None:
            probed.append(record.fine_tuned_model)
            await release.wait()  # a replica that takes discover_timeout_s to list it

        runner, store, launcher = stub_runner(tmp_path, on_succeeded=discover)
        old = [add_job(store, status="succeeded", fine_tuned_model=f"old{i}@v1") for i in range(3)]
        await asyncio.wait_for(runner.start(), 2)
        try:
            assert probed == [] and {r.id for r in old} <= runner._taken_in
            assert runner.owners == {f"old{i}@v1": "a" for i in range(3)}
            new = add_job(store)
            await runner.tick()
            store.write(store.read(new.id).model_copy(update={"status": "succeeded", "fine_tuned_model": "new@v1"}))
            launcher.finish(new.id)
            waiting = asyncio.create_task(runner.take_in([store.read(new.id)]))
            await asyncio.sleep(0.3)
            assert probed == ["new@v1"] and not waiting.done()  # the client is told once it is discoverable
            assert not runner.lock.locked()
            await asyncio.wait_for(runner.tick(), 2)  # other rounds (and cancels) go on meanwhile
            release.set()
            await asyncio.wait_for(waiting, 2)
            assert new.id in runner._taken_in and runner.owners["new@v1"] == "a"
        finally:
            await runner.stop()

    asyncio.run(main())


# ---------------------------------------------------------------------------- local workers (fix 5)
def _process_state(pid: int) -> str | None:
    """`R`, `S`, `Z` (exited, not yet collected by its parent) ...; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2]


def test_finished_local_workers_are_reaped_and_forgotten(tmp_path):
    home = HomeSettings(home=tmp_path)
    config = FineTuningConfig(worker_command=[sys.executable, str(WORKER)], max_concurrent_jobs=4)
    store = JobStore(home.jobs_dir)
    store.root.mkdir(parents=True)
    launcher = LocalLauncher(config, home)
    runner = JobRunner(config, store, launcher)
    records = [add_job(store) for _ in range(3)]
    runner.scan()
    pids = set(launcher._procs)
    assert len(pids) == 3
    wait_for("the jobs to succeed", lambda: all(store.read(r.id).status == "succeeded" for r in records))
    wait_for("the workers to exit", lambda: all(_process_state(p) == "Z" for p in pids))
    runner.scan()
    assert launcher._procs == {}
    assert [_process_state(p) for p in pids] == [None] * 3  # collected: no zombies left behind


def test_a_crashed_local_worker_still_reports_its_exit_code_after_a_reap(tmp_path):
    home = HomeSettings(home=tmp_path)
    config = FineTuningConfig(worker_command=[sys.executable, str(WORKER)])
    store = JobStore(home.jobs_dir)
    store.root.mkdir(parents=True)
    launcher = LocalLauncher(config, home)
    runner = JobRunner(config, store, launcher)
    record = add_job(store, suffix="crash")
    runner.scan()
    (pid,) = launcher._procs
    wait_for("the worker to crash", lambda: launcher._procs[pid].poll() is not None)
    runner.scan()  # its reap collects the worker before the round looks at the job
    failed = store.read(record.id)
    assert failed.status == "failed" and "exited with code 3" in failed.error["message"]



def test_a_job_cancelled_by_another_gateway_while_being_started_is_stopped_by_the_starter(tmp_path):
    runner, store, launcher = stub_runner(tmp_path)
    record = add_job(store)
    other = JobRunner(runner.config, store, launcher)
    launch = launcher.launch

    def launch_while_cancelled(rec, job_dir):
        assert other.cancel(rec.id).status == "cancelled"  # sees the empty claim: cannot stop anything yet
        return launch(rec, job_dir)

    launcher.launch = launch_while_cancelled
    runner.scan()
    assert launcher.stopped == [(record.id, False)]


@pytest.mark.parametrize("killed_as", ["running", "cancelled"])
def test_the_runner_removes_the_adapter_of_a_worker_killed_after_publishing(tmp_path, killed_as):
    # Out of memory during the gate, or SIGKILL past a cancel's grace: the worker never removed what it published,
    # so the team could still call the adapter of a job that did not succeed.
    home = HomeSettings(home=tmp_path)
    runner, store, launcher = stub_runner(tmp_path, adapters_dir=home.adapters_dir)
    kept = _stand_in_registry(home, "secret", "v1")
    other = _stand_in_registry(home, "secret", "v2")  # another job's version of the same name stays
    record = add_job(store, status="queued", adapter="secret@v1")
    runner.scan()
    assert launcher.launched == [record.id]
    if killed_as == "cancelled":
        runner.cancel(record.id)
    launcher.finish(record.id)  # the worker is gone without a word
    runner.scan()  # failed (worker_died), or the cancel's worker no longer stopping
    runner.scan()
    final = store.read(record.id)
    assert final.status == ("failed" if killed_as == "running" else "cancelled")
    assert not kept.path.exists() and other.path.exists()
    assert final.model_extra["adapter_removed_at"]
    assert any("Removed adapter secret@v1" in e["message"] for e in store.events(record.id))
    assert runner.owners.get("secret@v1") == "a"  # replicas may serve it until their next poll: still the team's


def test_a_succeeded_jobs_adapter_is_never_removed_by_the_runner(tmp_path):
    home = HomeSettings(home=tmp_path)
    runner, store, launcher = stub_runner(tmp_path, adapters_dir=home.adapters_dir)
    adapter = _stand_in_registry(home, "good", "v1")
    add_job(store, status="succeeded", adapter="good@v1", fine_tuned_model="good@v1")
    runner.scan()
    assert adapter.path.exists()
