"""The gateway process: one ASGI app that sends /v1 to the lean proxy, /admin to FastAPI, and answers /healthz,
/readyz and /metrics itself. Everything is built at start-up (lifespan), nothing at import time.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

import orjson

from gateway import errors as E
from gateway.accounts import Accounts
from gateway.admin import build_admin_app
from gateway.audit import open_audit_log
from gateway.audit_admin import AdminTrail
from gateway.config import GatewayConfig
from gateway.db import init_db, make_engine
from gateway.directory import Directory, KeyEntry
from gateway.fine_tuning import PREFIXES as FINE_TUNING_PATHS, FineTuning
from gateway.metrics import GatewayMetrics
from gateway.origin import Origins
from gateway.pii_watch import PiiRulesWatch
from gateway.proxy import JSON_HEADERS, Proxy, _respond
from gateway.quotas import QuotaLimits, make_quota_store
from gateway.routing import Router

log = logging.getLogger("sovereign.gateway")


def quota_subjects(entry: KeyEntry) -> list:
    """The quota subjects of a key: itself and its team, each only when it has a limit."""
    subjects = []
    for subject, limits in ((f"key:{entry.id}", entry.limits), (f"team:{entry.team.name}", entry.team.limits)):
        if any(v is not None for v in limits):
            rpm, tpm, daily, monthly = limits
            subjects.append((subject, QuotaLimits(requests_per_minute=rpm, tokens_per_minute=tpm,
                                                  daily_tokens=daily, monthly_tokens=monthly)))
    return subjects


class GatewayApp:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.engine = make_engine(config.resolved_database_url())
        self.accounts = Accounts(self.engine, AdminTrail(config.resolved_audit_url()))
        self.directory = Directory(self.engine, refresh_s=config.directory_refresh_s, subjects=quota_subjects,
                                   origins=Origins(config.trusted_proxies))
        self.router = Router(config.models, health_interval_s=config.health_check_interval_s,
                             probe_timeout_s=config.timeouts.connect + 5)
        self.proxy = Proxy(config, self.directory, self.router, self.metrics)
        self.admin = build_admin_app(self.accounts, self.directory, self.status,
                                     audit_url=config.resolved_audit_url())
        self.fine_tuning = FineTuning(config, self.directory, lambda: list(self.router.pools),
                                      on_succeeded=self._discover_adapter)
        self.proxy.owner = self.fine_tuning.owner  # adapters made by fine-tune jobs belong to their team
        self.pii_watch = PiiRulesWatch(config.pii_rules_refresh_s, self.metrics)
        self.quotas: Any = None
        self.audit: Any = None

    async def _discover_adapter(self, record: Any) -> None:
        # A client told "succeeded" should find fine_tuned_model in /v1/models at once.
        await self.router.discover(record.fine_tuned_model, within_s=self.config.fine_tuning.discover_timeout_s)

    # lifespan --------------------------------------------------------------------------------------------------
    async def startup(self) -> None:
        await asyncio.to_thread(init_db, self.engine)
        if self.config.bootstrap_key is not None:
            key_id = await asyncio.to_thread(self.accounts.ensure_bootstrap_key,
                                             self.config.bootstrap_key.get_secret_value())
            log.info("bootstrap admin key ready", extra={"key_id": key_id})
        self.quotas = make_quota_store(self.config.redis_url)
        self.audit = await asyncio.to_thread(open_audit_log, self.config.resolved_audit_url())
        self.proxy.quotas, self.proxy.audit = self.quotas, self.audit
        await self.directory.start()
        await self.proxy.start()
        await self.router.start(self.proxy.session)
        await self.fine_tuning.start()
        await self.pii_watch.start()
        log.info("gateway ready", extra={"models": list(self.config.models), "replicas": len(self.router.replicas)})

    async def shutdown(self) -> None:
        await self.pii_watch.stop()
        await self.fine_tuning.stop()
        await self.router.stop()
        await self.directory.stop()
        await self.proxy.close()
        if self.audit is not None:
            await self.audit.close()
        await asyncio.to_thread(self.accounts.trail.close)
        close = getattr(self.quotas, "close", None)
        if close is not None:
            await _maybe_await(close())
        await asyncio.to_thread(self.engine.dispose)

    # ASGI ------------------------------------------------------------------------------------------------------
    async def __call__(self, scope: dict, receive, send) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            if path.startswith(FINE_TUNING_PATHS):
                await self.fine_tuning.app(scope, receive, send)
            elif path.startswith("/v1/"):
                await self.proxy(scope, receive, send)
            elif path.startswith("/admin"):
                await self.admin(scope, receive, send)
            elif path == "/healthz":
                await _respond(send, 200, b'{"status":"ok"}', JSON_HEADERS, "-")
            elif path == "/readyz":
                ready = self.directory.loaded and self.router.healthy_count() > 0
                body = orjson.dumps({"ready": ready, **self.status()})
                await _respond(send, 200 if ready else 503, body, JSON_HEADERS, "-")
            elif path == "/metrics":
                self.metrics.inflight.set(self.proxy.inflight)
                for r in self.router.replicas.values():
                    self.metrics.replica_outstanding.labels(r.url).set(r.outstanding)
                    self.metrics.replica_healthy.labels(r.url).set(1 if r.healthy else 0)
                await _respond(send, 200, self.metrics.render(),
                               [(b"content-type", self.metrics.content_type.encode())], "-")
            else:
                err = E.not_found(path)
                await _respond(send, err.status, err.body(), JSON_HEADERS, "-")
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":  # not ours to serve
            await send({"type": "websocket.close", "code": 1003})

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("gateway failed to start")
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self.shutdown()
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return

    def status(self) -> dict[str, Any]:
        return {"directory_loaded": self.directory.loaded, "inflight": self.proxy.inflight,
                "replicas": [r.status() for r in self.router.replicas.values()],
                "models": [c["id"] for c in self.router.model_cards()], "pii_rules": self.pii_watch.status()}


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def serve(config: GatewayConfig) -> None:
    """Run the gateway with uvicorn on uvloop + httptools until SIGINT/SIGTERM."""
    import uvicorn

    app = GatewayApp(config)
    # proxy_headers off: nothing here reads the client's address, and uvicorn's X-Forwarded-* middleware cost 2-3 %
    # of the gateway's CPU per request (py-spy, 32 connections, streaming).
    tls = {}
    if config.tls_cert_file is not None:
        tls = {"ssl_certfile": str(config.tls_cert_file), "ssl_keyfile": str(config.tls_key_file),
               "ssl_keyfile_password": config.tls_key_password.get_secret_value() if config.tls_key_password else None}
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, loop="uvloop",
                                           http=_http_protocol(),
                                           lifespan="on", access_log=False, log_config=None, proxy_headers=False,
                                           timeout_keep_alive=75, backlog=4096, **tls))
    server.run()


def _http_protocol() -> Any:
    """The coalescing protocol subclasses uvicorn internals (tested against uvicorn 0.55): where another release
    moved them, the gateway still serves, with uvicorn's own protocol and one more write per answer."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        from gateway.http_protocol import CoalescingHttpToolsProtocol
        if callable(getattr(HttpToolsProtocol, "_start_asgi_task", None)):
            return CoalescingHttpToolsProtocol
    except ImportError:
        pass
    log.warning("this uvicorn release lacks the internals the coalescing protocol uses; serving with its own")
    return "httptools"
