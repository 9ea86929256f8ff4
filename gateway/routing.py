"""Pools of vLLM replicas per base model, adapter discovery, health checks and least-outstanding-requests choice.

Each replica is polled every `health_check_interval_s` on `GET /v1/models`: a 200 marks it healthy and tells which
LoRA adapters it serves (entries whose `parent` is a base model); a refused connection, a failed poll of a replica
that never answered, or two failed polls in a row mark it unhealthy. A connection failure on the request path marks a
replica unhealthy at once, so the next request goes elsewhere without waiting for the poll.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from gateway.background import cancel_and_wait
from sovereign.formats import version_order

log = logging.getLogger("sovereign.gateway.routing")
PROBE_FAILURES_TO_MARK = 2


def _refused(exc: BaseException) -> bool:
    """The replica's host answered that nothing listens on the port (the server is down, not slow)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return True
        seen = getattr(seen, "os_error", None) or seen.__cause__
    return False


@dataclass(slots=True, eq=False)
class Replica:
    url: str
    base_models: set[str] = field(default_factory=set)  # the configured pools it belongs to
    outstanding: int = 0
    healthy: bool = True  # optimistic until the first poll says otherwise
    served: dict[str, dict[str, Any]] = field(default_factory=dict)  # model id -> its /v1/models card
    last_error: str | None = None
    last_seen: float = 0.0
    probe_failures: int = 0  # consecutive failed health probes

    def status(self) -> dict[str, Any]:
        return {"url": self.url, "healthy": self.healthy, "outstanding": self.outstanding,
                "models": sorted(self.served), "last_error": self.last_error}


class Router:
    def __init__(self, pools: dict[str, list[str]], *, health_interval_s: float = 5.0,
                 probe_timeout_s: float = 5.0) -> None:
        self.replicas: dict[str, Replica] = {}
        self.pools: dict[str, list[Replica]] = {}
        for base, urls in pools.items():
            pool = []
            for url in urls:
                replica = self.replicas.setdefault(url, Replica(url))
                replica.base_models.add(base)
                pool.append(replica)
            self.pools[base] = pool
        self._adapters: dict[str, tuple[str, list[Replica]]] = {}  # adapter id -> (base, replicas serving it)
        self._versions: dict[str, list[str]] = {}  # adapter name -> its served `name@version` ids, newest first
        self.health_interval_s = health_interval_s
        self.probe_timeout_s = probe_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None
        self._last_probe = 0.0
        self._probe_lock = asyncio.Lock()

    # choosing --------------------------------------------------------------------------------------------------
    def resolve(self, model: str) -> tuple[str, str | None, list[Replica]] | None:
        """(base model, adapter or None, candidate replicas) for a model id; None if nobody serves it."""
        pool = self.pools.get(model)
        if pool is not None:
            return model, None, pool
        hit = self._adapters.get(model)
        if hit is not None:
            return hit[0], model, hit[1]
        return None

    def versions(self, name: str) -> list[str]:
        """The served versions of adapter `name` (ids `name@VERSION`), newest first: what a bare `name` may mean."""
        return self._versions.get(name, [])

    def aliases(self) -> list[tuple[str, list[str]]]:
        return list(self._versions.items())

    @staticmethod
    def pick(candidates: list[Replica], exclude: list[Replica]) -> Replica | None:
        """The healthy replica with the fewest requests in flight (random among ties); None if none is left."""
        best: list[Replica] = []
        low = None
        for r in candidates:
            if not r.healthy or r in exclude:
                continue
            if low is None or r.outstanding < low:
                best, low = [r], r.outstanding
            elif r.outstanding == low:
                best.append(r)
        if not best:
            return None
        return best[0] if len(best) == 1 else random.choice(best)

    def mark_failed(self, replica: Replica, error: str) -> None:
        if replica.healthy:
            log.warning("replica marked unhealthy", extra={"replica": replica.url, "error": error})
        replica.healthy = False
        replica.last_error = error

    def forget(self, replica: Replica, model_id: str) -> None:
        """The replica answered that it does not serve `model_id`: believe it until its next poll says otherwise."""
        if replica.served.pop(model_id, None) is not None:
            self._rebuild_adapters()

    # discovery -------------------------------------------------------------------------------------------------
    def model_cards(self) -> list[dict[str, Any]]:
        """One /v1/models card per base model and per discovered adapter."""
        cards: dict[str, dict[str, Any]] = {}
        for base, pool in self.pools.items():
            card = next((r.served[base] for r in pool if base in r.served), None)
            cards[base] = _card(base, card, parent=None)
        for adapter, (base, replicas) in self._adapters.items():
            card = next((r.served[adapter] for r in replicas if adapter in r.served), None)
            cards[adapter] = _card(adapter, card, parent=base)
        return list(cards.values())

    def _rebuild_adapters(self) -> None:
        adapters: dict[str, tuple[str, list[Replica]]] = {}
        for base, pool in self.pools.items():
            for r in pool:
                for model_id, card in r.served.items():
                    if model_id in self.pools or card.get("parent") != base:
                        continue
                    adapters.setdefault(model_id, (base, []))[1].append(r)
        self._adapters = adapters
        versions: dict[str, list[str]] = {}
        for model_id in adapters:
            name, at, _ = model_id.rpartition("@")
            if at and name not in self.pools and name not in adapters:
                versions.setdefault(name, []).append(model_id)
        for ids in versions.values():
            ids.sort(key=lambda model_id: version_order(model_id.rpartition("@")[2]), reverse=True)
        self._versions = versions

    async def _probe(self, replica: Replica) -> None:
        assert self._session is not None
        try:
            async with self._session.get(f"{replica.url}/v1/models",
                                         timeout=aiohttp.ClientTimeout(total=self.probe_timeout_s)) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"GET /v1/models answered {resp.status}")
            data = orjson.loads(body).get("data") or []
            replica.served = {m["id"]: m for m in data if isinstance(m, dict) and "id" in m}
            if not replica.healthy:
                log.info("replica healthy again", extra={"replica": replica.url})
            replica.healthy = True
            replica.last_error = None
            replica.last_seen = time.time()
            replica.probe_failures = 0
        except Exception as exc:
            # Nothing listening, or a replica that never answered (not started, a name that does not resolve), is
            # out at once; one that answered before gets a second probe after a slow or failed one (a burst, a
            # restart's first seconds), or one late probe would turn a lone replica's traffic into 503s and its
            # gateway unready until the next round.
            replica.probe_failures += 1
            error = f"{type(exc).__name__}: {exc}"[:300]
            if replica.probe_failures >= PROBE_FAILURES_TO_MARK or _refused(exc) or not replica.last_seen:
                self.mark_failed(replica, error)
            else:
                replica.last_error = error

    async def probe_all(self) -> None:
        async with self._probe_lock:
            await self._probe_round()

    async def _probe_round(self) -> None:
        await asyncio.gather(*(self._probe(r) for r in self.replicas.values()))
        self._rebuild_adapters()
        self._last_probe = time.monotonic()

    async def discover(self, model_id: str, within_s: float, every_s: float = 1.0) -> bool:
        """Probe until some replica lists `model_id` (a just-published adapter is hot-loaded asynchronously, and
        one probe can time out on a busy replica); False if it did not appear within `within_s`."""
        deadline = time.monotonic() + within_s
        while True:
            await self.probe_all()
            if self.resolve(model_id) is not None:
                return True
            if time.monotonic() >= deadline:
                log.warning("model not served by any replica yet", extra={"model": model_id, "waited_s": within_s})
                return False
            await asyncio.sleep(every_s)

    async def refresh_on_miss(self, min_age_s: float = 1.0) -> None:
        """A request named an unknown model: look again (a new adapter may have been loaded), at most once a second."""
        if time.monotonic() - self._last_probe >= min_age_s:
            async with self._probe_lock:  # misses arriving during a round share it: they wait here, then find it new
                if time.monotonic() - self._last_probe >= min_age_s:
                    await self._probe_round()

    async def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        await self.probe_all()
        self._task = asyncio.create_task(self._loop(), name="replica-health")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.probe_all()
            except Exception as exc:  # pragma: no cover - _probe catches per replica
                log.warning("health check round failed", extra={"error": repr(exc)})

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    def healthy_count(self) -> int:
        return sum(r.healthy for r in self.replicas.values())


def _card(model_id: str, upstream: dict[str, Any] | None, parent: str | None) -> dict[str, Any]:
    card = {"id": model_id, "object": "model", "created": int(upstream.get("created", 0)) if upstream else 0,
            "owned_by": "sovereign"}
    if parent is not None:
        card["parent"] = parent
    if upstream and upstream.get("max_model_len"):
        card["max_model_len"] = upstream["max_model_len"]
    return card
