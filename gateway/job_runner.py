"""The job runner: starts queued fine-tune jobs, at most `max_concurrent_jobs` at once, and watches their workers.

A worker is `sovereign finetune run-job JOB_DIR` (it moves the record to running and on to a terminal status).
`LocalLauncher` starts it as a detached process on this machine; `gateway.k8s_runner.KubernetesLauncher` submits a
Kubernetes Job. A job is claimed by creating `JOB_DIR/worker.json` exclusively, so gateways sharing the jobs folder
never start it twice. A worker that is gone while its record is not terminal (it crashed, was OOM-killed, or the
machine rebooted) is marked failed with the reason; that check also runs at gateway start. Only records the
gateway created (`runner` set) are managed: `sovereign finetune run` jobs run in their own process.

An adapter a job names (`fine_tuned_model`, or `adapter`, which the worker writes before publishing it) belongs to
the job's team whatever the job's status: a cancelled or failed job's adapter may still be served for a while. The
worker removes what it published when its job does not succeed; for a worker killed before it could (out of memory,
SIGKILL), the local runner removes it once the job has ended.
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
from sovereign.formats import JobRecord, job_record_lock, utcnow, write_json_atomic
from sovereign.offline import offline_env
from sovereign.settings import HomeSettings

log = logging.getLogger("sovereign.gateway.jobs")

CLAIM = "worker.json"
WORKER_LOG = "worker.log"
CANCEL_GRACE_S = 30.0
# A claim still empty after this long was made by a gateway that died while starting the worker.
STARTING_TIMEOUT_S = 600.0
# The owner of an adapter that jobs of several teams name: no team's, so only an explicit grant reaches it.
CONTESTED = " (several teams)"  # team names are stripped: none can equal this
# The owner of an adapter whose job did not succeed but which is still published (a Kubernetes gateway cannot write
# to the registry; a removal that failed): no team may call it, whatever it is granted.
WITHDRAWN = " (its fine-tune job did not succeed)"


@dataclass
class WorkerState:
    alive: bool
    detail: str = ""  # why it is gone: exit code, the Kubernetes Job's condition, the log's last lines


class Launcher(Protocol):
    def launch(self, record: JobRecord, job_dir: Path) -> dict[str, Any]: ...
    def state(self, record: JobRecord, job_dir: Path, claim: dict[str, Any]) -> WorkerState: ...
    def stop(self, record: JobRecord, job_dir: Path, claim: dict[str, Any], *, force: bool = False) -> None: ...
    def reap(self) -> None: ...


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
        self._procs: dict[int, Any] = {}  # pid -> Popen, for the workers this process started and that still run
        self._exit_codes: dict[int, int] = {}  # pid -> exit code, of the workers the last reap() collected

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
        code = proc.poll() if proc is not None else self._exit_codes.get(pid)
        if proc is not None and code is None:
            return WorkerState(True)
        if code is not None:
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

    def reap(self) -> None:
        """Collect the workers that exited (no zombies, no Popen kept for the gateway's lifetime).

        Their exit codes stay until the next reap: state() reads them in the round that follows, for a job whose
        worker died before finishing its record. A finished job's is never asked for again.
        """
        exited = {pid: code for pid, proc in self._procs.items() if (code := proc.poll()) is not None}
        for pid in exited:
            del self._procs[pid]
        self._exit_codes = exited


# --------------------------------------------------------------------------------------------- the scheduler
class JobRunner:
    def __init__(self, config: FineTuningConfig, store: JobStore, launcher: Launcher,
                 on_succeeded: Callable[[JobRecord], Awaitable[None]] | None = None,
                 adapters_dir: Path | None = None) -> None:
        self.config = config
        self.store = store
        self.launcher = launcher
        self.adapters_dir = adapters_dir  # the registry, where this gateway shares the workers' disk (local runner)
        self.on_succeeded = on_succeeded
        self.owners: dict[str, str] = {}  # adapter served name -> team whose job made it (rebuilt every round)
        self._named: dict[str, list[tuple[str, str, bool]]] = {}  # job id -> [(adapter, team, still published)]
        self._finished: set[str] = set()  # terminal jobs whose worker is gone: never read again
        self._taken_in: set[str] = set()  # succeeded jobs whose adapter is owned and discovered
        self._discovering: dict[str, asyncio.Task] = {}  # job id -> discovery of its adapter under way
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self.lock = asyncio.Lock()  # one scan or cancel at a time

    # lifecycle -------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        # Jobs that finished before this start are only taken in: probing replicas for every adapter ever made
        # would hold up the gateway's start by discover_timeout_s each, and their replicas' health polls find them.
        await self.tick(discover=False)
        self._task = asyncio.create_task(self._loop(), name="finetune-runner")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        for task in list(self._discovering.values()):
            await cancel_and_wait(task)

    def wake(self) -> None:
        self._wake.set()

    async def take_in(self, records: list[JobRecord]) -> None:
        """Before a client is told a job succeeded, make its adapter the owner's and discoverable."""
        waiting = [r.id for r in records if r.status == "succeeded" and r.id not in self._taken_in]
        if not waiting:
            return
        if any(job_id not in self._discovering for job_id in waiting):
            await self.tick()  # on the lock: a round under way that already noted the job finishes first
        tasks = [self._discovering[job_id] for job_id in waiting if job_id in self._discovering]
        if tasks:
            await asyncio.wait(tasks)  # not gather: a client going away must not cancel a discovery others await

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

    async def tick(self, *, discover: bool = True) -> None:
        async with self.lock:
            succeeded = await asyncio.to_thread(self.scan)
            for record in succeeded:
                self._note_succeeded(record, discover)

    def _note_succeeded(self, record: JobRecord, discover: bool) -> None:
        if not discover or self.on_succeeded is None or not record.fine_tuned_model:
            self._taken_in.add(record.id)
            return
        log.info("fine-tune job succeeded", extra={"job_id": record.id, "model": record.fine_tuned_model})
        # Outside the lock: a discovery may wait discover_timeout_s, and cancels and the next round must not.
        self._discovering[record.id] = asyncio.create_task(self._discover(record), name=f"discover-{record.id}")

    async def _discover(self, record: JobRecord) -> None:
        try:
            await self.on_succeeded(record)
        except Exception:  # the replicas' next health poll finds it anyway
            log.exception("could not discover the adapter of a succeeded job", extra={"job_id": record.id})
        finally:
            self._taken_in.add(record.id)
            self._discovering.pop(record.id, None)

    # one round -------------------------------------------------------------------------------------------------
    def scan(self) -> list[JobRecord]:
        """Note finished jobs, fail jobs whose worker is gone, start queued ones; returns jobs that just succeeded."""
        self.launcher.reap()
        succeeded, queued, active = [], [], 0
        for job_id in self.store.ids():
            if job_id in self._finished:
                continue
            record = self.store.read(job_id)
            if record is None:
                continue
            self._note_adapters(record)
            if record.status in TERMINAL:
                if self._still_stopping(record):
                    active += 1  # its worker may still hold the GPU
                    continue
                self._finished.add(job_id)
                if record.status == "succeeded":
                    succeeded.append(record)
                else:
                    self._remove_leftover_adapter(record)
                continue
            if not (record.model_extra or {}).get("runner"):
                continue  # not a gateway job
            claim = self._claim_of(job_id)
            if claim is None:
                if record.status == "queued":
                    queued.append(record)
                continue
            if claim.get("starting"):
                active += 1  # another gateway is starting its worker right now
                continue
            state = self.launcher.state(record, self.store.job_dir(job_id), claim)
            if state.alive:
                active += 1
            else:
                self._worker_gone(job_id, state)
        self.owners = self._owners()
        queued.sort(key=lambda r: (r.created_at, r.id))
        for record in queued:
            if active >= self.config.max_concurrent_jobs:
                break
            if self._launch(record):
                active += 1
        return succeeded

    # adapters and their teams ----------------------------------------------------------------------------------
    def _note_adapters(self, record: JobRecord) -> None:
        extra = record.model_extra or {}
        published = not extra.get("adapter_removed_at")
        names = {n for n in (record.fine_tuned_model, extra.get("adapter")) if isinstance(n, str) and n}
        failed = record.status in TERMINAL and record.status != "succeeded"
        if record.owner and names:
            team = WITHDRAWN if published and failed else record.owner
            self._named[record.id] = [(name, team, published) for name in names]

    def _owners(self) -> dict[str, str]:
        """Each named adapter's team. A job that removed its adapter yields to one whose adapter is published under
        the same name (the version was free again); jobs of several teams naming a published one make it no team's.
        """
        teams: dict[str, dict[bool, set[str]]] = {}
        for named in self._named.values():
            for name, team, published in named:
                teams.setdefault(name, {True: set(), False: set()})[published].add(team)
        owners = {}
        for name, by_state in teams.items():
            claimants = by_state[True] or by_state[False]
            if len(claimants) > 1:  # another job published the version: the registry refuses a version it holds, so
                claimants.discard(WITHDRAWN)  # the withdrawn one was removed from it since
            owners[name] = next(iter(claimants)) if len(claimants) == 1 else CONTESTED
            if owners[name] == CONTESTED and self.owners.get(name) != CONTESTED:
                log.warning("jobs of several teams name the same adapter; only an explicit grant reaches it",
                            extra={"model": name, "teams": sorted(claimants)})
        return owners

    # workers ---------------------------------------------------------------------------------------------------
    def _claim_of(self, job_id: str) -> dict[str, Any] | None:
        path = self.store.job_dir(job_id) / CLAIM
        try:
            text = path.read_text(encoding="utf-8")
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            claim = json.loads(text)
        except json.JSONDecodeError:
            claim = {}
        if not claim and age < STARTING_TIMEOUT_S:
            return {"starting": True}  # created, and a gateway is starting the worker (a Kubernetes POST may hang)
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
        current = self.store.read(record.id)
        if current is not None and current.status == "cancelled":
            # Another gateway cancelled it while the claim was empty, so it could not stop the worker: this one can.
            self.launcher.stop(current, job_dir, claim)
        return True

    def _worker_gone(self, job_id: str, state: WorkerState) -> None:
        record = self.store.read(job_id)
        if record is not None and (record.model_extra or {}).get("cancel_requested_at"):
            # a worker that wrote over the cancel (it did not take the record's lock) still ends cancelled
            if self._transition(job_id, status="cancelled", finished_at=utcnow()) is not None:
                self.store.append_event(job_id, "Fine-tuning job cancelled")
            return
        self._fail(job_id, "worker_died", state.detail or "the fine-tune worker is gone")

    def _remove_leftover_adapter(self, record: JobRecord) -> None:
        """A worker killed after publishing (out of memory, SIGKILL past the cancel grace) could not remove its
        adapter, so clients of its team could still call the adapter of a failed job: only a succeeded job leaves one.
        """
        extra = record.model_extra or {}
        served = extra.get("adapter")
        if not isinstance(served, str) or extra.get("adapter_removed_at"):
            return
        if self.adapters_dir is None:  # withdrawn (_note_adapters) until someone with the registry removes it
            if self._stamp(record.id, "adapter_withdrawn_at"):  # once, across gateway restarts and replicas
                self.store.append_event(record.id, f"Adapter {served} is withdrawn: no key may call it, as the job did "
                                        f"not succeed. This gateway cannot write to the adapter registry; remove it "
                                        f"there with `sovereign adapters remove {served}`.", level="warn")
            return
        from serving.adapters import AdapterRegistry
        from serving.errors import AdapterNotFound, ServingError

        name, _, version = served.rpartition("@")
        if not name or not version:
            return
        try:
            AdapterRegistry(self.adapters_dir).remove(name, version)
        except AdapterNotFound:
            pass
        except ServingError as exc:  # it stays withdrawn (_note_adapters); say so where the team looks
            self.store.append_event(record.id, f"Could not remove adapter {served}: {exc}", level="error")
            return
        current = self._stamp(record.id, "adapter_removed_at")
        if current is None:
            return
        self._note_adapters(current)  # its version is free again: no longer withdrawn
        self.store.append_event(record.id, f"Removed adapter {served}: the job did not succeed")
        log.info("removed the adapter of a job that did not succeed", extra={"job_id": record.id, "model": served})

    def _stamp(self, job_id: str, field: str) -> JobRecord | None:
        """Set `field` of the job's record to now, under the record's lock; None if it is gone or has one already."""
        with job_record_lock(self.store.job_dir(job_id)):
            current = self.store.read(job_id)
            if current is None or (current.model_extra or {}).get(field):
                return None
            current = current.model_copy(update={field: int(time.time())})
            self.store.write(current)
            return current

    def _fail(self, job_id: str, code: str, message: str) -> None:
        error = {"code": code, "message": message, "param": None}
        if self._transition(job_id, status="failed", finished_at=utcnow(), error=error) is None:
            return  # the worker finished the record just before exiting
        self.store.append_event(job_id, f"Fine-tuning job failed: {message}", level="error", data={"code": code})
        log.warning("fine-tune job failed", extra={"job_id": job_id, "code": code})

    def _transition(self, job_id: str, **changes: Any) -> JobRecord | None:
        """Apply `changes` to a job that has not finished; None if it has (its worker's final status wins)."""
        if self.store.read(job_id) is None:
            return None  # also keeps a malformed id from naming a lock file
        with job_record_lock(self.store.job_dir(job_id)):  # the worker updates the record under the same lock
            record = self.store.read(job_id)
            if record is None or record.status in TERMINAL:
                return None
            record = record.model_copy(update=changes)
            self.store.write(record)
            return record

    def _still_stopping(self, record: JobRecord) -> bool:
        """A cancelled job's worker gets CANCEL_GRACE_S to stop after SIGTERM, then SIGKILL; until it is gone the
        job keeps its slot, whichever gateway cancelled it."""
        if record.status != "cancelled" or not (record.model_extra or {}).get("runner"):
            return False
        claim = self._claim_of(record.id)
        if claim is None:
            return False
        if claim.get("starting"):
            return True  # the gateway starting it will find it cancelled; its worker then exits at once
        if not self.launcher.state(record, self.store.job_dir(record.id), claim).alive:
            return False
        since = (record.model_extra or {}).get("cancel_requested_at")
        if isinstance(since, (int, float)) and time.time() - since > CANCEL_GRACE_S:
            try:
                self.launcher.stop(record, self.store.job_dir(record.id), claim, force=True)
            except Exception:
                log.exception("could not kill the worker", extra={"job_id": record.id})
        return True

    # cancel ----------------------------------------------------------------------------------------------------
    def cancel(self, job_id: str) -> JobRecord | None:
        """Mark the job cancelled and SIGTERM its worker; returns the record, None if it had already finished."""
        record = self._transition(job_id, status="cancelled", finished_at=utcnow(),
                                  cancel_requested_at=int(time.time()))
        if record is None:
            return None
        claim = self._claim_of(job_id)
        self.store.append_event(job_id, "Fine-tuning job cancelled" if claim is None
                                else "Cancelling the fine-tuning job: stopping its worker")
        if claim and not claim.get("starting"):
            try:
                self.launcher.stop(record, self.store.job_dir(job_id), claim)
            except Exception:
                log.exception("could not stop the worker", extra={"job_id": job_id})
        return record
