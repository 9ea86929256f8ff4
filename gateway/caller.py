"""The FastAPI dependency for /v1 endpoints served by FastAPI (files, fine-tuning jobs): any live key, from the
in-memory directory like the proxy. At module level so FastAPI can resolve the annotation.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway.directory import Directory, KeyEntry
from gateway.request_checks import bearer


def authenticate(scope: dict, directory: Directory) -> KeyEntry:
    """The live key a request carries, or the 401 that says why there is none (missing, unknown, expired). Reads
    headers only, so it may run before the body."""
    secret = bearer(scope)
    entry = directory.lookup(secret) if secret else None
    if entry is None:
        raise directory.refusal(secret)
    return entry


def require_key(request: Request) -> KeyEntry:
    return authenticate(request.scope, request.app.state.directory)


Caller = Annotated[KeyEntry, Depends(require_key)]
