"""Keeps the adapters loaded in a running vLLM equal to what the registry holds for its base model.

Polling (not inotify) because the registry usually sits on a network volume shared by every replica.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import httpx

from serving.adapters import AdapterRegistry, servability_problems
from sovereign.formats import ModelManifest

log = logging.getLogger("sovereign.serving.adapters")


@dataclass
class AdapterState:
    loaded: dict[str, str] = field(default_factory=dict)  # served name -> manifest hash
    refused: dict[str, str] = field(default_factory=dict)  # served name -> reason


class AdapterSync:
    def __init__(self, registry: AdapterRegistry, base: ModelManifest, max_lora_rank: int) -> None:
        self.registry = registry
        self.base = base
        self.max_lora_rank = max_lora_rank
        self.state = AdapterState()

    def reset(self) -> None:
        """The engine restarted empty: everything must be loaded again."""
        self.state = AdapterState()

    async def reconcile(self, client: httpx.AsyncClient, base_url: str) -> None:
        wanted = {a.served_name: a for a in self.registry.list(self.base.name)}
        for name in [n for n in self.state.loaded if n not in wanted]:
            await self._unload(client, base_url, name)
        for name in [n for n in self.state.refused if n not in wanted]:
            del self.state.refused[name]
        for name, adapter in wanted.items():
            digest = adapter.manifest.canonical_sha256()
            if self.state.loaded.get(name) == digest or name in self.state.refused:
                continue
            if name in self.state.loaded:  # republished under the same name: replace it
                await self._unload(client, base_url, name)
            problems = servability_problems(adapter.path, adapter.manifest, self.base, self.max_lora_rank)
            if problems:
                self._refuse(name, "; ".join(problems))
                continue
            resp = await client.post(f"{base_url}/v1/load_lora_adapter",
                                     json={"lora_name": name, "lora_path": str(adapter.path)}, timeout=120)
            if resp.status_code == 200:
                self.state.loaded[name] = digest
                log.info("adapter loaded", extra={"adapter": name})
            else:
                self._refuse(name, f"vLLM refused it: {_error_text(resp)}")

    async def _unload(self, client: httpx.AsyncClient, base_url: str, name: str) -> None:
        resp = await client.post(f"{base_url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)
        if resp.status_code not in (200, 404):
            log.warning("unloading %s failed: %s", name, _error_text(resp))
            return
        self.state.loaded.pop(name, None)
        log.info("adapter unloaded", extra={"adapter": name})

    def _refuse(self, name: str, reason: str) -> None:
        self.state.refused[name] = reason
        log.warning("adapter %s refused: %s", name, reason)


def _error_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        return f"{resp.status_code} {err.get('message', err) if isinstance(err, dict) else err}"
    except ValueError:
        return f"{resp.status_code} {resp.text[:300]}"
