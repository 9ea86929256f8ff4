"""The FastAPI dependency for /v1 endpoints served by FastAPI (files, fine-tuning jobs): any live key, from the
in-memory directory like the proxy. At module level so FastAPI can resolve the annotation.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from gateway import errors as E
from gateway.directory import KeyEntry
from gateway.proxy import _bearer


def require_key(request: Request) -> KeyEntry:
    secret = _bearer(request.scope)
    entry = request.app.state.directory.lookup(secret) if secret else None
    if entry is None:
        raise E.invalid_api_key()
    return entry


Caller = Annotated[KeyEntry, Depends(require_key)]
