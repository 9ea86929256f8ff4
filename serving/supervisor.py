"""Runs vLLM's OpenAI server for one store model: verify, start, wait for ready, keep adapters in sync with the
registry, restart with backoff when the engine dies, stop cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from serving.adapter_sync import AdapterSync
from serving.adapters import AdapterRegistry
from serving.engine import EngineProcess, port_taken
from serving.errors import ModelTampered
from serving.health import HealthServer
from serving.profile import ServingProfile
from serving.store import ModelStore

log = logging.getLogger("sovereign.serving.supervisor")

# An engine that fails this many health probes in a row is treated as dead even if its process still runs.
_UNHEALTHY_PROBES = 5


class Supervisor:
    def __init__(self, profile: ServingProfile, store: ModelStore, registry: AdapterRegistry, model: str,
                 run_dir: Path, served_name: str | None = None) -> None:
        self.profile = profile
        self.store = store
        self.registry = registry
        self.model = model
        self.served_name = served_name or model
        self.run_dir = run_dir
        self._stop = asyncio.Event()
        self.engine: EngineProcess | None = None
        self.sync: AdapterSync | None = None
        self.state: dict[str, Any] = {"engine": "starting", "model": model, "served_name": self.served_name,
                                      "model_verified": False, "restarts": 0, "last_exit_code": None,
                                      "failed_starts": 0, "error": None, "adapters_synced": False,
                                      "started_at": time.time()}

    def status(self) -> dict[str, Any]:
        s = dict(self.state)
        s["pid"] = self.engine.pid if self.engine else None
        s["engine_url"] = self.engine.base_url if self.engine else None
        s["adapters_loaded"] = sorted(self.sync.state.loaded) if self.sync else []
        s["adapters_refused"] = dict(self.sync.state.refused) if self.sync else {}
        s["ready"] = s["engine"] == "ready" and s["model_verified"] and s["adapters_synced"]
        return s

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        """Supervise until stopped; returns the process exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        health = HealthServer(self.status, self.profile.host, self.profile.health_port)
        health.start()
        try:
            with self.store.serving(self.model):  # `sovereign models remove` refuses the model meanwhile
                return await self._supervise()
        finally:
            if self.engine:
                await self.engine.stop()
            self.state["engine"] = "stopped"
            health.stop()

    async def _verify(self) -> bool:
        try:
            manifest = await asyncio.to_thread(self.store.verify, self.model)
        except ModelTampered as exc:
            self.state.update(engine="refused", model_verified=False, error=str(exc))
            log.error("model refused: %s", exc)
            return False
        self.state["model_verified"] = True
        self.sync = AdapterSync(self.registry, manifest, self.profile.max_lora_rank) if self.profile.enable_lora else None
        return True

    async def _supervise(self) -> int:
        backoff = self.profile.restart_backoff_s
        async with httpx.AsyncClient(trust_env=False) as client:
            while not self._stop.is_set():
                if not await self._verify():
                    return 3
                if port_taken(self.profile.host, self.profile.port):
                    self.state["engine"] = "restarting"
                    self._start_failed(f"Address already in use: port {self.profile.port} on {self.profile.host} is "
                                       f"taken by another process (an earlier vLLM?); stop it or serve on another "
                                       f"--port")
                    backoff = await self._back_off(backoff)
                    continue
                self.engine = EngineProcess(self.profile, self.store.path(self.model), self.served_name,
                                            self.run_dir / "vllm.log")
                await self.engine.start()
                self.state.update(engine="starting", adapters_synced=False)
                log.info("engine starting", extra={"pid": self.engine.pid, "cmd": " ".join(self.engine.command())})
                ready = await self._until_stop(self.engine.wait_ready(client, self.profile.ready_timeout_s))
                if ready:
                    self.state.update(engine="ready", failed_starts=0, error=None)
                    backoff = self.profile.restart_backoff_s
                    log.info("engine ready", extra={"url": self.engine.base_url})
                    await self._watch(client)
                if self._stop.is_set():
                    break
                exited = not self.engine.alive()
                await self.engine.stop()
                code = self.engine.proc.returncode if self.engine.proc else None
                self.state.update(engine="restarting", last_exit_code=code, restarts=self.state["restarts"] + 1)
                if not ready:  # a start that never answered: say why, where `sovereign up` and health show it
                    reason = self.engine.failure_reason() or (
                        f"exit code {code}, no error line in {self.engine.log_path}" if exited
                        else f"not ready within {self.profile.ready_timeout_s:g} s")
                    self._start_failed(reason, exit_code=code, log=str(self.engine.log_path))
                log.warning("engine down, restarting", extra={"exit_code": code, "backoff_s": backoff})
                backoff = await self._back_off(backoff)
        return 0

    def _start_failed(self, reason: str, **extra: Any) -> None:
        """Count a start that never answered and say why, where `sovereign up` and health show it."""
        self.state.update(failed_starts=self.state["failed_starts"] + 1, error=reason)
        log.error("engine failed to start: %s", reason, extra=extra)

    async def _back_off(self, backoff: float) -> float:
        """Wait `backoff` seconds (or until stopped); the next wait is twice as long, up to the profile's cap."""
        await self._until_stop(asyncio.sleep(backoff))
        return min(backoff * 2, self.profile.restart_backoff_max_s)

    async def _watch(self, client: httpx.AsyncClient) -> None:
        """While the engine is healthy, reconcile adapters every poll interval."""
        assert self.engine is not None
        if self.sync:
            self.sync.reset()
        failures = 0
        while not self._stop.is_set():
            if not self.engine.alive():
                return
            if await self.engine.healthy(client):
                failures = 0
                if self.sync:
                    try:
                        await self.sync.reconcile(client, self.engine.base_url)
                    except httpx.HTTPError as exc:
                        log.warning("adapter sync failed: %s", exc)
                self.state["adapters_synced"] = True
            else:
                failures += 1
                if failures >= _UNHEALTHY_PROBES:
                    log.error("engine unhealthy, killing it")
                    return
            await self._until_stop(asyncio.sleep(self.profile.adapter_poll_s))

    async def _until_stop(self, coro) -> Any:
        """Await `coro` unless a stop is requested first (then cancel it and return None)."""
        task = asyncio.ensure_future(coro)
        stopper = asyncio.ensure_future(self._stop.wait())
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for t in (task, stopper):
            if t not in done:
                t.cancel()
        return task.result() if task in done and not task.cancelled() else None
