"""The in-memory directory of keys and team policies that the request path reads (never the database).

A background task polls the database's change counter every `directory_refresh_s` and, when it moved, reloads all
teams and live keys into a new snapshot that replaces the old one in one assignment. A revoked key therefore stops
working on every gateway replica within one refresh interval plus one query.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from datetime import UTC, datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from gateway import errors as E
from gateway.accounts import LIMIT_FIELDS, as_utc, hash_secret
from gateway.background import cancel_and_wait
from gateway.db import ApiKey, Team, read_generation
from gateway.origin import Origins, parse_networks

log = logging.getLogger("sovereign.gateway.directory")

Limits = tuple[int | None, int | None, int | None, int | None]  # rpm, tpm, daily, monthly


@dataclass(slots=True)
class TeamPolicy:
    name: str
    allowed_models: tuple[str, ...]
    max_tokens: int | None
    pii: str
    injection: str
    audit_content: str
    limits: Limits
    _allowed_cache: dict[str, bool] = field(default_factory=dict, repr=False)

    def allows(self, model: str) -> bool:
        hit = self._allowed_cache.get(model)
        if hit is None:
            hit = any(fnmatchcase(model, pattern) for pattern in self.allowed_models)
            if len(self._allowed_cache) < 10_000:
                self._allowed_cache[model] = hit
        return hit

    def names(self, model: str) -> bool:
        """Allowed by a pattern other than the catch-all `*`: how a team is granted another team's adapter."""
        return any(pattern != "*" and fnmatchcase(model, pattern) for pattern in self.allowed_models)

    def summary(self) -> dict[str, Any]:
        return {"pii": self.pii, "injection": self.injection, "audit_content": self.audit_content,
                "max_tokens": self.max_tokens}


@dataclass(slots=True)
class KeyEntry:
    id: str
    secret_hash: str
    team: TeamPolicy
    is_admin: bool
    limits: Limits
    quota_subjects: list = field(default_factory=list)  # [(subject, QuotaLimits)], built once per snapshot
    expires_at: float | None = None  # unix seconds
    revoked_at: float | None = None  # unix seconds; such entries live only in the directory's refusal table
    networks: tuple | None = None  # where it may be used from (origin.py); None: anywhere




def _limits(row: Any) -> Limits:
    return tuple(getattr(row, f) for f in LIMIT_FIELDS)  # type: ignore[return-value]


class Directory:
    """Keys by secret hash, rebuilt from the database when its change counter moves."""

    def __init__(self, engine: Engine, *, refresh_s: float = 0.5,
                 subjects: Callable[[KeyEntry], list] | None = None, origins: Origins | None = None) -> None:
        self.engine = engine
        self.origins = origins or Origins()  # where requests come from, for keys bound to networks
        self.refresh_s = refresh_s
        self._subjects = subjects
        self._keys: dict[str, KeyEntry] = {}
        self._revoked: dict[str, KeyEntry] = {}  # read by `refusal` only, never on the request path
        self._generation = -1
        self._reload_lock = threading.Lock()
        self._task: asyncio.Task | None = None
        self.loaded = False

    def lookup(self, secret: str) -> KeyEntry | None:
        """The live key with this secret; None for an unknown, revoked or expired one (`refusal` says which)."""
        digest = hash_secret(secret)
        entry = self._keys.get(digest)
        # The dict lookup already matched; compare_digest keeps the final check constant-time all the same.
        if entry is None or not hmac.compare_digest(entry.secret_hash, digest):
            return None
        if entry.expires_at is not None and entry.expires_at <= time.time():
            return None  # expiry needs no reload: it reaches every gateway at the same moment
        return entry

    def refusal(self, secret: str | None) -> E.GatewayError:
        """The 401 for a secret `lookup` did not accept. An expired or revoked key says when it stopped and what to
        do (whoever holds the secret knows the key already), and carries the key as `refused_key`: the request path
        audits the attempt under its key and team, so a leaked or forgotten key still in use shows in the trail."""
        digest = hash_secret(secret) if secret else None
        entry = self._keys.get(digest) if digest else None
        if entry is not None and entry.expires_at is not None:
            what, at = "expired", entry.expires_at
        elif digest and (entry := self._revoked.get(digest)) is not None and entry.revoked_at is not None:
            what, at = "was revoked", entry.revoked_at
        else:
            return E.invalid_api_key()
        when = datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")
        refused = E.invalid_api_key(f"This API key ({entry.id}) {what} at {when}; ask an administrator for a new "
                                    f"one (`sovereign keys create`).")
        refused.refused_key = entry
        return refused

    def reload_if_changed(self) -> bool:
        # The refresh thread and an admin request's thread both reload: unserialized, an older snapshot could land
        # last yet carry the newer generation, and a revoked key would then work until the next change.
        with self._reload_lock:
            generation = read_generation(self.engine)
            if generation == self._generation and self.loaded:
                return False
            self._keys, self._revoked = self._load()
            self._generation = generation
            self.loaded = True
            return True

    def _load(self) -> tuple[dict[str, KeyEntry], dict[str, KeyEntry]]:
        with Session(self.engine) as s:
            teams = {t.name: TeamPolicy(name=t.name, allowed_models=tuple(t.allowed_models or ()),
                                        max_tokens=t.max_tokens, pii=t.pii, injection=t.injection,
                                        audit_content=t.audit_content, limits=_limits(t))
                     for t in s.scalars(select(Team)).all()}
            keys: dict[str, KeyEntry] = {}
            revoked: dict[str, KeyEntry] = {}
            for k in s.scalars(select(ApiKey)).all():
                team = teams.get(k.team)
                if team is None:
                    continue
                expires, gone = as_utc(k.expires_at), as_utc(k.revoked_at)
                entry = KeyEntry(id=k.id, secret_hash=k.secret_hash, team=team, is_admin=k.is_admin,
                                 limits=_limits(k), expires_at=expires.timestamp() if expires else None,
                                 revoked_at=gone.timestamp() if gone else None,
                                 networks=parse_networks(k.allowed_networks, "allowed_networks")
                                 if k.allowed_networks is not None else None)
                if gone is not None:
                    revoked[k.secret_hash] = entry
                    continue
                if self._subjects is not None:
                    entry.quota_subjects = self._subjects(entry)
                keys[k.secret_hash] = entry
        return keys, revoked

    async def start(self) -> None:
        await asyncio.to_thread(self.reload_if_changed)
        self._task = asyncio.create_task(self._loop(), name="directory-refresh")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                if await asyncio.to_thread(self.reload_if_changed):
                    log.info("directory reloaded", extra={"keys": len(self._keys), "generation": self._generation})
            except Exception as exc:  # keep serving from the last snapshot while the database is away
                log.warning("directory refresh failed", extra={"error": repr(exc)})

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
