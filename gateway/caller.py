"""The FastAPI dependency for /v1 endpoints served by FastAPI (files, fine-tuning jobs): any live key, from the
in-memory directory like the proxy. At module level so FastAPI can resolve the annotation.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import Depends, Request

from gateway.accounts import hash_secret
from gateway.directory import Directory, KeyEntry
from gateway.request_checks import bearer

log = logging.getLogger("sovereign.gateway.auth")


def authenticate(scope: dict, directory: Directory) -> KeyEntry:
    """The live key a request carries, or the 401 that says why there is none (missing, unknown, expired,
    revoked). Reads headers only, so it may run before the body."""
    secret = bearer(scope)
    entry = directory.lookup(secret) if secret else None
    if entry is None:
        refused = directory.refusal(secret)
        if getattr(refused, "refused_key", None) is None:
            note_keyless_refusal(scope, secret)
        raise refused
    if entry.networks is not None:
        directory.origins.check(entry, scope)
    return entry


def note_keyless_refusal(scope: dict, secret: str | None) -> None:
    """A 401 that no key of ours stands behind (none sent, or a secret no gateway issued) has no team to audit it
    under; one log line says where it came from, and the secret's fingerprint (never the secret), so that a scan
    for keys, or an app configured with a wrong one, can be found and told apart."""
    client = scope.get("client")
    forwarded = next((v for k, v in scope.get("headers") or () if k == b"x-forwarded-for"), None)
    log.warning("refused: no valid API key", extra={
        "path": scope.get("path"), "client": client[0] if client else None,
        "forwarded_for": forwarded.decode("latin-1") if forwarded else None,  # as sent: unverified
        "reason": "unknown key" if secret else "no key",
        "key_fingerprint": hash_secret(secret)[:12] if secret else None})


def require_key(request: Request) -> KeyEntry:
    return authenticate(request.scope, request.app.state.directory)


Caller = Annotated[KeyEntry, Depends(require_key)]
