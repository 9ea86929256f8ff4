"""Fine-tuning through the gateway: the /v1/files and /v1/fine_tuning FastAPI app, the file and job stores, and the
job runner (local processes or Kubernetes Jobs). `GatewayApp` mounts it and starts the runner with the gateway.

A succeeded job's adapter belongs to the team that created it (`owner`): the proxy lets that team call it even when
its allowed_models patterns name only base models, and other teams only when their patterns name it (the catch-all
`*` does not: an adapter can give away what its training data held). The replicas' /v1/models is probed again at
once, so the new adapter is routable as soon as the job reports success.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import errors as E
from gateway.config import GatewayConfig
from gateway.directory import Directory
from gateway.file_store import FileStore
from gateway.files_api import build_files_router
from gateway.job_runner import JobRunner, LocalLauncher
from gateway.job_store import TERMINAL, JobStore
from gateway.jobs_api import build_jobs_router
from sovereign.formats import JobRecord
from sovereign.settings import HomeSettings

PREFIXES = ("/v1/files", "/v1/fine_tuning")


def _error(status: int, message: str, code: str | None, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": code}}, status_code=status)


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
        self.runner = JobRunner(ft, self.jobs, launcher, on_succeeded=on_succeeded)
        self.app = self._build_app(directory, base_models, ft.runner, ft.preset, ft.max_file_bytes)

    def owner(self, model: str) -> str | None:
        """The team whose fine-tune job made `model`, None for anything else."""
        return self.runner.owners.get(model)

    async def start(self) -> None:
        self.jobs.root.mkdir(parents=True, exist_ok=True)
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

        @app.middleware("http")
        async def _upload_limit(request: Request, call_next):
            # Refuse an oversized upload before reading it; the store also counts while it streams.
            length = request.headers.get("content-length")
            if request.method == "POST" and length and length.isdigit() and int(length) > max_bytes + (1 << 16):
                exc = E.GatewayError(413, f"The upload is larger than the limit of {max_bytes} bytes; split the "
                                          f"file or ask an admin to raise fine_tuning.max_file_bytes.",
                                     code="file_too_large", param="file")
                return JSONResponse(exc.payload(), status_code=413)
            return await call_next(request)

        @app.exception_handler(E.GatewayError)
        async def _gateway_error(_: Request, exc: E.GatewayError) -> JSONResponse:
            return JSONResponse(exc.payload(), status_code=exc.status, headers=exc.headers)

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
            codes = {404: "unknown_url", 405: "method_not_allowed"}
            return _error(exc.status_code, str(exc.detail), codes.get(exc.status_code, f"http_{exc.status_code}"))

        @app.exception_handler(RequestValidationError)
        async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
            errors = exc.errors()
            first = errors[0] if errors else {}
            loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
            message = f"{loc or 'body'}: {first.get('msg', 'invalid request')}"
            if first.get("type") == "missing":
                message = f"`{loc}` is required."
            return _error(400, message, "invalid_request", loc or None)

        app.include_router(build_files_router(self.files, self._file_in_use))
        app.include_router(build_jobs_router(self.jobs, self.files, self.runner, base_models=base_models,
                                             runner_mode=runner_mode, preset=preset))
        return app
