"""The supervisor's own health endpoint, served from a thread so it answers while the supervisor loop waits.

GET /healthz: the supervisor is alive. GET /readyz: engine up, model verified, adapters reconciled (503 otherwise).
GET /status: the whole state as JSON.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving.errors import ServingError


def build_health_app(status: Callable[[], dict[str, Any]]) -> Starlette:
    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> JSONResponse:
        s = status()
        return JSONResponse(s, status_code=200 if s.get("ready") else 503)

    async def full(_: Request) -> JSONResponse:
        return JSONResponse(status())

    return Starlette(routes=[Route("/healthz", healthz), Route("/readyz", readyz), Route("/status", full)])


class HealthServer:
    def __init__(self, status: Callable[[], dict[str, Any]], host: str, port: int) -> None:
        config = uvicorn.Config(build_health_app(status), host=host, port=port, log_level="warning",
                                access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="health", daemon=True)

    def start(self, timeout: float = 30) -> None:
        """Return once it listens; raise if it cannot (uvicorn ends its thread on a taken port, and a supervisor
        without its health endpoint would run an engine nobody can see is ready)."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                cfg = self.server.config
                raise ServingError(f"the supervisor's health endpoint cannot listen on {cfg.host}:{cfg.port} (in use "
                                   f"by another process?); choose another --health-port",
                                   code="health_port_unavailable")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
