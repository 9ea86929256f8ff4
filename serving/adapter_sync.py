"""Keeps the adapters loaded in a running vLLM equal to what the registry holds for its base model.

Polling (not inotify) because the registry usually sits on a network volume shared by every replica.
A refusal for a reason in the adapter itself (our checks, vLLM's 4xx, and its 500, which is how vLLM answers any
exception from loading the weights) holds for that exact manifest only, so a republish under the same served name is
tried afresh, and an engine restart clears it; a transient failure (connection error, timeout, 502/503/504, 408,
429) is retried on later polls with exponential backoff.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from serving.adapters import AdapterRegistry, servability_problems
from sovereign.formats import ModelManifest

log = logging.getLogger("sovereign.serving.adapters")


@dataclass
class _Retry:
    digest: str
    at: float
    delay: float
    reason: str


@dataclass
class AdapterState:
    loaded: dict[str, str] = field(default_factory=dict)  # served name -> manifest hash
    refused: dict[str, str] = field(default_factory=dict)  # served name -> reason (what health shows)
    refused_digest: dict[str, str] = field(default_factory=dict)  # served name -> manifest hash refused
    retry: dict[str, _Retry] = field(default_factory=dict)  # served name -> when to try a transient failure again


# Statuses that say "not now" rather than "never": retried with backoff.
_TRANSIENT = (408, 429, 502, 503, 504)


class AdapterSync:
    def __init__(self, registry: AdapterRegistry, base: ModelManifest, max_lora_rank: int, *,
                 retry_backoff_s: float = 1.0, retry_backoff_max_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.base = base
        self.max_lora_rank = max_lora_rank
        self.retry_backoff_s = retry_backoff_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self.clock = clock
        self.state = AdapterState()

    def reset(self) -> None:
        """The engine restarted empty: everything must be loaded again."""
        self.state = AdapterState()

    async def reconcile(self, client: httpx.AsyncClient, base_url: str) -> None:
        wanted = {a.served_name: a for a in self.registry.list(self.base.name)}
        for name in [n for n in self.state.loaded if n not in wanted]:
            await self._unload(client, base_url, name)
        for name, adapter in wanted.items():
            digest = adapter.manifest.canonical_sha256()
            if self.state.loaded.get(name) == digest or self.state.refused_digest.get(name) == digest:
                continue
            retry = self.state.retry.get(name)
            if retry and retry.digest == digest and self.clock() < retry.at:
                continue
            if name in self.state.loaded:  # republished under the same name: replace it
                await self._unload(client, base_url, name)
                if name in self.state.loaded:
                    continue  # vLLM still holds the old one; try again next poll
            problems = servability_problems(adapter.path, adapter.manifest, self.base, self.max_lora_rank)
            if problems:
                self._refuse(name, digest, "; ".join(problems))
                continue
            try:
                resp = await client.post(f"{base_url}/v1/load_lora_adapter",
                                         json={"lora_name": name, "lora_path": str(adapter.path)}, timeout=120)
            except httpx.TransportError as exc:  # connection refused/reset, timeout: vLLM busy or restarting
                self._retry_later(name, digest, f"{type(exc).__name__}: {exc}")
                continue
            if resp.status_code == 200:
                self.state.loaded[name] = digest
                self._forget(name)
                log.info("adapter loaded", extra={"adapter": name})
            elif resp.status_code in _TRANSIENT:
                self._retry_later(name, digest, _error_text(resp))
            else:
                self._refuse(name, digest, f"vLLM refused it: {_error_text(resp)}")
        for name in [n for n in (*self.state.refused_digest, *self.state.retry) if n not in wanted]:
            self._forget(name)

    async def _unload(self, client: httpx.AsyncClient, base_url: str, name: str) -> None:
        try:
            resp = await client.post(f"{base_url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)
        except httpx.TransportError as exc:  # still loaded as far as we know: tried again next poll
            log.warning("unloading %s failed: %s: %s", name, type(exc).__name__, exc)
            return
        if resp.status_code not in (200, 404):
            log.warning("unloading %s failed: %s", name, _error_text(resp))
            return
        self.state.loaded.pop(name, None)
        log.info("adapter unloaded", extra={"adapter": name})

    def _refuse(self, name: str, digest: str, reason: str) -> None:
        self._forget(name)
        self.state.refused[name] = reason
        self.state.refused_digest[name] = digest
        log.warning("adapter %s refused: %s", name, reason)

    def _retry_later(self, name: str, digest: str, reason: str) -> None:
        prev = self.state.retry.get(name)
        # A republished manifest starts its backoff afresh.
        delay = (min(prev.delay * 2, self.retry_backoff_max_s) if prev and prev.digest == digest
                 else self.retry_backoff_s)
        self._forget(name)
        self.state.retry[name] = _Retry(digest, self.clock() + delay, delay, reason)
        log.warning("loading adapter %s failed, retrying in %gs: %s", name, delay, reason)

    def _forget(self, name: str) -> None:
        self.state.refused.pop(name, None)
        self.state.refused_digest.pop(name, None)
        self.state.retry.pop(name, None)


def _error_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        return f"{resp.status_code} {err.get('message', err) if isinstance(err, dict) else err}"
    except ValueError:
        return f"{resp.status_code} {resp.text[:300]}"
