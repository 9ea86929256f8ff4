"""Fine-tuning through the gateway: the /v1/files and /v1/fine_tuning FastAPI app, the file and job stores, and the
job runner (local processes or Kubernetes Jobs). `GatewayApp` mounts it and starts the runner with the gateway.

A succeeded job's adapter belongs to the team that created it (`owner`): the proxy lets that team call it even when
its allowed_models patterns name only base models, and other teams only when their patterns name it (the catch-all
`*` does not: an adapter can give away what its training data held). The replicas' /v1/models is probed again at
once, so the new adapter is routable as soon as the job reports success.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import errors as E
from gateway.caller import authenticate
from gateway.config import GatewayConfig
from gateway.directory import Directory
from gateway.file_store import FileStore
from gateway.files_api import build_files_router
from gateway.job_runner import JobRunner, LocalLauncher
from gateway.job_store import TERMINAL, JobStore
from gateway.jobs_api import build_jobs_router
from gateway.request_checks import content_length
from sovereign.formats import JobRecord
from sovereign.settings import HomeSettings

PREFIXES = ("/v1/files", "/v1/fine_tuning")
JSON_BODY_LIMIT = 1 << 20  # a job-create body is a few hundred bytes; only uploads may be large
MULTIPART_SLACK = 1 << 16  # the multipart envelope around an upload of max_file_bytes
# The tags pydantic appends to a location for the branch of a union that failed ("n_epochs.constrained-int"). A
# metadata key so named is dropped as well; the param still names the field.
_UNION_BRANCH = re.compile(r"(constrained-)?(int|float|str|bool)|literal\[.*\]")

log = logging.getLogger("sovereign.gateway.fine_tuning")


def _error(status: int, message: str, code: str | None, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": code}}, status_code=status)


def _validation_error(errors: list[dict[str, Any]]) -> JSONResponse:
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
        return _error(400, f"The request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
                           f" at character {first.get('loc', ('', '?'))[-1]}.", "invalid_request")
    loc = _param(first)
    if first.get("type") == "missing":
        return _error(400, f"`{loc}` is required.", "invalid_request", loc or None)
    # One error per union branch ("an integer" and "'auto'"): say all the value may be.
    messages = [e.get("msg", "invalid request") for e in errors if _param(e) == loc]
    message = messages[0] + "".join(f", or {m.removeprefix('Input should be ')}" for m in messages[1:])
    return _error(400, f"{loc or 'body'}: {message}", "invalid_request", loc or None)


def _param(error: dict[str, Any]) -> str:
    return ".".join(str(p) for p in error.get("loc", ())
                    if p not in ("body", "query", "path") and not (isinstance(p, str) and _UNION_BRANCH.fullmatch(p)))


class _Refused(Exception):
    """Raised into the app from `receive` once the guard has answered: nothing the app does next is sent."""


class _Exchange:
    """One request as the guard sees it: the body counted as the app reads it, and a `send` that knows whether a
    response has started and drops the app's once the guard has answered."""

    def __init__(self, scope: dict, receive, send, limit: int, too_large: E.GatewayError) -> None:
        self.scope, self._receive, self._send = scope, receive, send
        self.limit, self.too_large = limit, too_large
        self.started = self.answered = False
        self.received = 0

    async def receive(self) -> dict:
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                if not self.started:
                    await self.answer(self.too_large)
                raise _Refused
        return message

    async def send(self, message: dict) -> None:
        if self.answered:
            return
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)

    async def answer(self, exc: E.GatewayError) -> None:
        response = JSONResponse(exc.payload(), status_code=exc.status, headers=exc.headers)
        await response(self.scope, self._receive, self._send)
        self.answered = True


class _Guard:
    """The app's outer layer: what must happen before FastAPI reads a body, and the last word on errors.

    FastAPI reads a body (spooling a multipart upload to disk) before it resolves the key dependency, and a chunked
    body has no Content-Length to refuse it by. So a POST without a live key is refused unread, and a body is counted
    as it arrives and refused the moment it passes the limit. An unexpected exception is logged and answered as a JSON
    500 here: an exception handler would not do, since Starlette's ServerErrorMiddleware re-raises after calling it.
    """

    def __init__(self, app, *, directory: Directory, max_file_bytes: int) -> None:
        self.app, self.directory = app, directory
        self.upload_limit = max_file_bytes + MULTIPART_SLACK
        self.upload_too_large = E.GatewayError(413, f"The upload is larger than the limit of {max_file_bytes} bytes; "
                                                    f"split the file or ask an admin to raise "
                                                    f"fine_tuning.max_file_bytes.", code="file_too_large",
                                               param="file")

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/v1/files":
            exchange = _Exchange(scope, receive, send, self.upload_limit, self.upload_too_large)
        else:
            exchange = _Exchange(scope, receive, send, JSON_BODY_LIMIT, E.body_too_large(JSON_BODY_LIMIT))
        refusal = self._refusal(exchange)
        if refusal is not None:
            await exchange.answer(refusal)
            return
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except Exception:
            if exchange.answered:
                return
            if exchange.started:
                raise  # too late for an error object; the server cuts the response off
            log.exception("fine-tuning request failed", extra={"method": scope["method"], "path": scope["path"]})
            await exchange.answer(E.GatewayError(500, "The server had an error while processing your request; it "
                                                      "has been logged.", type="server_error", code="internal_error"))

    def _refusal(self, exchange: _Exchange) -> E.GatewayError | None:
        """What can be refused on the headers alone."""
        if exchange.scope["method"] == "POST":
            try:
                authenticate(exchange.scope, self.directory)
            except E.GatewayError as refused:
                return refused
        length = content_length(exchange.scope)
        return exchange.too_large if length is not None and length > exchange.limit else None


class FineTuning:
    def __init__(self, config: GatewayConfig, directory: Directory, base_models: Callable[[], list[str]],
                 on_succeeded: Callable[[JobRecord], Awaitable[None]] | None = None,
                 home: HomeSettings | None = None) -> None:
        ft = config.fine_tuning
        home = home or HomeSettings()
        self.files = FileStore(home.files_dir, ft.max_file_bytes)
        self.jobs = JobStore(home.jobs_dir)
        if ft.runner == "kubernetes":
            from gateway.k8s_runner import KubernetesLauncher

            launcher = KubernetesLauncher(ft.kubernetes)
        else:
            launcher = LocalLauncher(ft, home, config.models)
        self.runner = JobRunner(ft, self.jobs, launcher, on_succeeded=on_succeeded,
                                adapters_dir=None if ft.runner == "kubernetes" else home.adapters_dir)
        self.app = self._build_app(directory, base_models, ft.runner, ft.preset, ft.max_file_bytes)

    def owner(self, model: str) -> str | None:
        """The team whose fine-tune job made `model`, None for anything else."""
        return self.runner.owners.get(model)

    async def start(self) -> None:
        self.jobs.root.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.files.sweep)  # what a killed upload or delete left behind
        await self.runner.start()

    async def stop(self) -> None:
        await self.runner.stop()

    def _file_in_use(self, file_id: str, team: str) -> str | None:
        for record in self.jobs.owned(team):
            if record.status not in TERMINAL and file_id in (record.training_file, record.validation_file):
                return record.id
        return None

    def _build_app(self, directory: Directory, base_models, runner_mode: str, preset: str | None,
                   max_bytes: int) -> FastAPI:
        app = FastAPI(title="Sovereign fine-tuning API", docs_url=None, redoc_url=None, openapi_url=None)
        app.state.directory = directory

        app.add_middleware(_Guard, directory=directory, max_file_bytes=max_bytes)

        @app.exception_handler(E.GatewayError)
        async def _gateway_error(_: Request, exc: E.GatewayError) -> JSONResponse:
            return JSONResponse(exc.payload(), status_code=exc.status, headers=exc.headers)

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
            codes = {404: "unknown_url", 405: "method_not_allowed"}
            return _error(exc.status_code, str(exc.detail), codes.get(exc.status_code, f"http_{exc.status_code}"))

        @app.exception_handler(RequestValidationError)
        async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
            return _validation_error(list(exc.errors()))

        app.include_router(build_files_router(self.files, self._file_in_use))
        app.include_router(build_jobs_router(self.jobs, self.files, self.runner, base_models=base_models,
                                             runner_mode=runner_mode, preset=preset))
        return app
