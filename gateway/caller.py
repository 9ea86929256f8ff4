"""The FastAPI dependency for /v1 endpoints served by FastAPI (files, fine-tuning jobs): any live key, from the
in-memory directory like the proxy. At module level so FastAPI can resolve the annotation.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway.directory import Directory, KeyEntry
from gateway.request_checks import bearer


def key_entry(scope: dict, directory: Directory) -> KeyEntry | None:
    """The live key a request carries, None without one. Reads headers only, so it may run before the body."""
    secret = bearer(scope)
    return directory.lookup(secret) if secret else None


def require_key(request: Request) -> KeyEntry:
    directory = request.app.state.directory
    entry = key_entry(request.scope, directory)
    if entry is None:
        raise directory.refusal(bearer(request.scope))
    return entry


Caller = Annotated[KeyEntry, Depends(require_key)]
