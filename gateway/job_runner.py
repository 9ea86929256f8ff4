"""The job runner: starts queued fine-tune jobs, at most `max_concurrent_jobs` at once, and watches their workers.

A worker is `sovereign finetune run-job JOB_DIR` (it moves the record to running and on to a terminal status).
`LocalLauncher` starts it as a detached process on this machine; `gateway.k8s_runner.KubernetesLauncher` submits a
Kubernetes Job. A job is claimed by creating `JOB_DIR/worker.json` exclusively, so gateways sharing the jobs folder
never start it twice. A worker that is gone while its record is not terminal (it crashed, was OOM-killed, or the
machine rebooted) is marked failed with the reason; that check also runs at gateway start. Only records the
gateway created (`runner` set) are managed: `sovereign finetune run` jobs run in their own process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gateway.background import cancel_and_wait
from gateway.finetune_config import FineTuningConfig
from gateway.job_store import TERMINAL, JobStore
from sovereign.formats import JobRecord, utcnow, write_json_atomic
from sovereign.offline import offline_env
from sovereign.settings import HomeSettings

log = logging.getLogger("sovereign.gateway.jobs")

CLAIM = "worker.json"
WORKER_LOG = "worker.log"
CANCEL_GRACE_S = 30.0


@dataclass
class WorkerState:
    alive: bool
    detail: str = ""  # why it is gone: exit code, the Kubernetes Job's condition, the log's last lines


class Launcher(Protocol):
    def launch(self, record: JobRecord, job_dir: Path) -> dict[str, Any]: ...
    def state(self, record: JobRecord, job_dir: Path, claim: dict[str, Any]) -> WorkerState: ...
    def stop(self, record: JobRecord, job_dir: Path, claim: dict[str, Any], *, force: bool = False) -> None: ...


# --------------------------------------------------------------------------------------------- local processes
def _proc_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/PID/stat): tells a live worker from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if fields and fields[0] == "Z":
        return None  # a zombie has finished
    return fields[19] if len(fields) > 19 else None


def _tail(path: Path, lines: int = 8, max_chars: int = 1500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])[-max_chars:]


class LocalLauncher:
    """`worker_command JOB_DIR` as a detached process (own session, offline env), logging to JOB_DIR/worker.log."""

    def __init__(self, config: FineTuningConfig, home: HomeSettings,
                 pools: dict[str, list[str]] | None = None) -> None:
        self.command = config.worker_command or [sys.executable, "-m", "sovereign.cli", "finetune", "run-job"]
        self.env = offline_env(SOVEREIGN_HOME=str(home.home), **config.worker_env)
        self.pools = pools or {}
        self._procs: dict[int, Any] = {}  # pid -> Popen, for the workers this process started (reaps them)

    def launch(self, record: JobRecord, job_dir: Path) -> dict[str, Any]:
        import subprocess

        env = self.env
        if "SOVEREIGN_FINETUNE_SERVING_URL" not in env and self.pools.get(record.model):
            # The consistency gate checks the adapter on a replica serving the job's base model.
            env = {**env, "SOVEREIGN_FINETUNE_SERVING_URL": self.pools[record.model][0]}
        with open(job_dir / WORKER_LOG, "ab") as out:
            proc = subprocess.Popen([*self.command, str(job_dir)], env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._procs[proc.pid] = proc
        return {"runner": "local", "pid": proc.pid, "start_time": _proc_start_time(proc.pid)}

    def state(self, record: JobRecord, job_dir: Path, claim: dict[str, Any]) -> WorkerState:
        pid = claim.get("pid")
        if not isinstance(pid, int):
            return WorkerState(False, "the worker was never started (the gateway stopped while starting it)")
        proc = self._procs.get(pid)
        if proc is not None:
            code = proc.poll()
            if code is None:
                return WorkerState(True)
            self._procs.pop(pid, None)
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        else:
            started = _proc_start_time(pid)
            if started is not None and started == claim.get("start_time"):
                return WorkerState(True)
            how = "is no longer running"
        tail = _tail(job_dir / WORKER_LOG)
        detail = f"the fine-tune worker (pid {pid}) {how} before finishing the job"
        return WorkerState(False, detail + (f"; last lines of {WORKER_LOG}:\n{tail}" if tail else ""))

    def stop(self, record: JobRecord, job_dir: Path, claim: dict[str, Any], *, force: bool = False) -> None:
        pid = claim.get("pid")
        if not isinstance(pid, int) or not self.state(record, job_dir, claim).alive:
            return
        try:
            os.killpg(pid, signal.SIGKILL if force else signal.SIGTERM)  # its own session: children go too
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------------------------- the scheduler
class JobRunner:
    def __init__(self, config: FineTuningConfig, store: JobStore, launcher: Launcher,
                 on_succeeded: Callable[[JobRecord], Awaitable[None]] | None = None) -> None:
        self.config = config
        self.store = store
        self.launcher = launcher
        self.on_succeeded = on_succeeded
        self.owners: dict[str, str] = {}  # fine_tuned_model -> team that created the job
        self._finished: set[str] = set()  # terminal jobs, never read again
        self._taken_in: set[str] = set()  # succeeded jobs whose adapter is owned and discovered
        self._cancelling: dict[str, float] = {}  # job id -> when SIGTERM went out
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self.lock = asyncio.Lock()  # one scan or cancel at a time

    # lifecycle -------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.tick()
        self._task = asyncio.create_task(self._loop(), name="finetune-runner")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    def wake(self) -> None:
        self._wake.set()

    async def take_in(self, records: list[JobRecord]) -> None:
        """Before a client is told a job succeeded, make its adapter the owner's and discoverable (one round now)."""
        # A round already under way may have noted the job without having discovered its adapter yet: waiting on
        # the lock through tick() lets that round finish first.
        if any(r.status == "succeeded" and r.id not in self._taken_in for r in records):
            await self.tick()

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.poll_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.tick()
            except Exception:  # keep watching; the next round may succeed
                log.exception("fine-tune runner round failed")

    async def tick(self) -> None:
        async with self.lock:
            succeeded = await asyncio.to_thread(self.scan)
            for record in succeeded:
                log.info("fine-tune job succeeded", extra={"job_id": record.id, "model": record.fine_tuned_model})
                if self.on_succeeded is not None:
                    await self.on_succeeded(record)
                self._taken_in.add(record.id)

    # one round -------------------------------------------------------------------------------------------------
    def scan(self) -> list[JobRecord]:
        """Note finished jobs, fail jobs whose worker is gone, start queued ones; returns jobs that just succeeded."""
        succeeded, queued, active = [], [], 0
        for job_id in self.store.ids():
            if job_id in self._finished:
                continue
            record = self.store.read(job_id)
            if record is None:
                continue
            if record.status in TERMINAL:
                if job_id in self._cancelling and self._still_stopping(record):
                    continue
                self._finished.add(job_id)
                if record.status == "succeeded" and record.fine_tuned_model and record.owner:
                    self.owners[record.fine_tuned_model] = record.owner
                    succeeded.append(record)
                continue
            if not (record.model_extra or {}).get("runner"):
                continue  # not a gateway job
            claim = self._claim_of(job_id)
            if claim is None:
                if record.status == "queued":
                    queued.append(record)
                continue
            state = self.launcher.state(record, self.store.job_dir(job_id), claim)
            if state.alive:
                active += 1
            else:
                self._worker_gone(job_id, state)
        queued.sort(key=lambda r: (r.created_at, r.id))
        for record in queued:
            if active >= self.config.max_concurrent_jobs:
                break
            if self._launch(record):
                active += 1
        return succeeded

    def _claim_of(self, job_id: str) -> dict[str, Any] | None:
        try:
            text = (self.store.job_dir(job_id) / CLAIM).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            claim = json.loads(text)
        except json.JSONDecodeError:
            claim = {}
        if not claim and time.time() - (self.store.job_dir(job_id) / CLAIM).stat().st_mtime < 30:
            return {"starting": True}  # another gateway is starting it right now
        return claim if isinstance(claim, dict) else {}

    def _launch(self, record: JobRecord) -> bool:
        job_dir = self.store.job_dir(record.id)
        try:
            fd = os.open(job_dir / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False  # another gateway took it
        os.close(fd)
        try:
            claim = self.launcher.launch(record, job_dir)
        except Exception as exc:
            log.exception("could not start fine-tune worker", extra={"job_id": record.id})
            write_json_atomic(job_dir / CLAIM, {"error": repr(exc)})
            self._fail(record.id, "worker_start_failed", f"The fine-tune worker could not be started: {exc}")
            return False
        write_json_atomic(job_dir / CLAIM, {**claim, "launched_at": int(time.time())})
        log.info("fine-tune worker started", extra={"job_id": record.id, **claim})
        return True

    def _worker_gone(self, job_id: str, state: WorkerState) -> None:
        record = self.store.read(job_id)  # the worker may have finished the record just before exiting
        if record is None or record.status in TERMINAL:
            return
        if job_id in self._cancelling or (record.model_extra or {}).get("cancel_requested_at"):
            self._cancelling.pop(job_id, None)
            self._set(record, status="cancelled", finished_at=utcnow())
            self.store.append_event(job_id, "Fine-tuning job cancelled")
            return
        self._fail(job_id, "worker_died", state.detail or "the fine-tune worker is gone")

    def _fail(self, job_id: str, code: str, message: str) -> None:
        record = self.store.read(job_id)
        if record is None or record.status in TERMINAL:
            return
        self._set(record, status="failed", finished_at=utcnow(), error={"code": code, "message": message,
                                                                        "param": None})
        self.store.append_event(job_id, f"Fine-tuning job failed: {message}", level="error", data={"code": code})
        log.warning("fine-tune job failed", extra={"job_id": job_id, "code": code})

    def _set(self, record: JobRecord, **changes: Any) -> JobRecord:
        record = record.model_copy(update=changes)
        self.store.write(record)
        return record

    def _escalate(self, record: JobRecord, claim: dict[str, Any]) -> None:
        since = self._cancelling.get(record.id)
        if since is not None and time.monotonic() - since > CANCEL_GRACE_S:
            self.launcher.stop(record, self.store.job_dir(record.id), claim, force=True)

    def _still_stopping(self, record: JobRecord) -> bool:
        """A cancelled job's worker gets CANCEL_GRACE_S to stop after SIGTERM, then SIGKILL."""
        claim = self._claim_of(record.id) or {}
        if claim.get("starting"):
            return True
        if claim and self.launcher.state(record, self.store.job_dir(record.id), claim).alive:
            self._escalate(record, claim)
            return True
        self._cancelling.pop(record.id, None)
        return False

    # cancel ----------------------------------------------------------------------------------------------------
    def cancel(self, job_id: str) -> JobRecord | None:
        """Mark the job cancelled and SIGTERM its worker; returns the record, None if it had already finished."""
        record = self.store.read(job_id)
        if record is None or record.status in TERMINAL:
            return None
        claim = self._claim_of(job_id)
        record = self._set(record, status="cancelled", finished_at=utcnow(), cancel_requested_at=int(time.time()))
        self.store.append_event(job_id, "Fine-tuning job cancelled" if claim is None
                                else "Cancelling the fine-tuning job: stopping its worker")
        if claim and not claim.get("starting"):
            self._cancelling[job_id] = time.monotonic()
            try:
                self.launcher.stop(record, self.store.job_dir(job_id), claim)
            except Exception:
                log.exception("could not stop the worker", extra={"job_id": job_id})
        return record
