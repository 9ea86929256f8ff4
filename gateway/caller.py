"""The FastAPI dependency for /v1 endpoints served by FastAPI (files, fine-tuning jobs): any live key, from the
in-memory directory like the proxy. At module level so FastAPI can resolve the annotation.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway import errors as E
from gateway.directory import Directory, KeyEntry
from gateway.request_checks import bearer


def key_entry(scope: dict, directory: Directory) -> KeyEntry | None:
    """The live key a request carries, None without one. Reads headers only, so it may run before the body."""
    secret = bearer(scope)
    return directory.lookup(secret) if secret else None


def require_key(request: Request) -> KeyEntry:
    entry = key_entry(request.scope, request.app.state.directory)
    if entry is None:
        raise E.invalid_api_key()
    return entry


Caller = Annotated[KeyEntry, Depends(require_key)]
