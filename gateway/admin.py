"""The admin API (FastAPI, under /admin): teams and keys, for an admin key only.

Clarity wins over speed here, so it uses pydantic and the database directly; each write bumps the directory's
change counter, so every gateway replica sees it within one refresh interval (this one at once).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import errors as E
from gateway.accounts import (AccountError, Accounts, KeyCreated, KeyOut, KeyRotation, KeySpec, KeyUpdate, TeamOut,
                              TeamSpec, TeamUpdate)
from gateway.caller import authenticate
from gateway.directory import Directory, KeyEntry


def _error(status: int, message: str, type_: str, code: str | None, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


def require_admin(request: Request) -> KeyEntry:
    entry = authenticate(request.scope, request.app.state.directory)
    if not entry.is_admin:
        raise E.admin_required()
    return entry


Admin = Annotated[KeyEntry, Depends(require_admin)]


def build_admin_app(accounts: Accounts, directory: Directory, status: Any = None,
                    audit_url: str | None = None) -> FastAPI:
    app = FastAPI(title="Sovereign gateway admin API", version="1", docs_url="/admin/docs",
                  openapi_url="/admin/openapi.json", redoc_url=None)

    app.state.directory = directory

    def changed() -> None:
        directory.reload_if_changed()

    @app.exception_handler(E.GatewayError)
    async def _gateway_error(_: Request, exc: E.GatewayError) -> JSONResponse:
        return JSONResponse(exc.payload(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "unknown_url", 405: "method_not_allowed"}
        return _error(exc.status_code, str(exc.detail), "invalid_request_error",
                      codes.get(exc.status_code, f"http_{exc.status_code}"))

    @app.exception_handler(AccountError)
    async def _account_error(_: Request, exc: AccountError) -> JSONResponse:
        return _error(exc.status, exc.message, "invalid_request_error", exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # its loc is a character offset, not a field
            return _error(400, f"The request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
                               f" at character {first.get('loc', ('', '?'))[-1]}.", "invalid_request_error",
                          "invalid_request")
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{loc or 'body'}: {first.get('msg', 'invalid request')}", "invalid_request_error",
                      "invalid_request", loc or None)

    @app.exception_handler(DataError)
    async def _data_error(_: Request, exc: DataError) -> JSONResponse:
        # What the database cannot hold (a NUL in a path parameter, say): the request's fault, not a 500.
        return _error(400, f"The database refused a value of this request: {str(exc.orig).splitlines()[0]}",
                      "invalid_request_error", "invalid_value")

    @app.exception_handler(IntegrityError)
    async def _integrity_error(_: Request, exc: IntegrityError) -> JSONResponse:
        # Two admins creating the same name at once: the loser of the race gets what a later request would.
        return _error(409, "This conflicts with a record written at the same time (the name exists now).",
                      "invalid_request_error", "conflict")

    @app.get("/admin/teams", response_model=list[TeamOut])
    def list_teams(_: Admin) -> list[TeamOut]:
        return accounts.list_teams()

    @app.post("/admin/teams", response_model=TeamOut, status_code=201)
    def create_team(spec: TeamSpec, admin: Admin) -> TeamOut:
        out = accounts.create_team(spec, by=admin.id)
        changed()
        return out

    @app.get("/admin/teams/{name}", response_model=TeamOut)
    def get_team(name: str, _: Admin) -> TeamOut:
        return accounts.get_team(name)

    @app.patch("/admin/teams/{name}", response_model=TeamOut)
    def update_team(name: str, changes: TeamUpdate, admin: Admin) -> TeamOut:
        out = accounts.update_team(name, changes, by=admin.id)
        changed()
        return out

    @app.delete("/admin/teams/{name}")
    def delete_team(name: str, admin: Admin, force: bool = False) -> dict:
        deleted = accounts.delete_team(name, force=force, by=admin.id)
        changed()
        return {"deleted": name, "keys_deleted": deleted}

    @app.get("/admin/keys", response_model=list[KeyOut])
    def list_keys(_: Admin, team: str | None = None, include_revoked: bool = False) -> list[KeyOut]:
        return accounts.list_keys(team, include_revoked=include_revoked)

    @app.post("/admin/keys", response_model=KeyCreated, status_code=201)
    def create_key(spec: KeySpec, admin: Admin) -> KeyCreated:
        out = accounts.create_key(spec, by=admin.id)
        changed()
        return out

    @app.post("/admin/keys/{key_id}/revoke", response_model=KeyOut)
    def revoke_key(key_id: str, admin: Admin) -> KeyOut:
        out = accounts.revoke_key(key_id, by=admin.id)
        changed()
        return out

    @app.patch("/admin/keys/{key_id}", response_model=KeyOut)
    def update_key(key_id: str, changes: KeyUpdate, admin: Admin) -> KeyOut:
        out = accounts.update_key(key_id, changes, by=admin.id)
        changed()
        return out

    @app.post("/admin/keys/{key_id}/rotate", response_model=KeyCreated, status_code=201)
    def rotate_key(key_id: str, admin: Admin, rotation: KeyRotation | None = None) -> KeyCreated:
        rotation = rotation or KeyRotation()
        out = accounts.rotate_key(key_id, grace=timedelta(seconds=rotation.grace_seconds),
                                  expires_at=rotation.expires_at, by=admin.id)
        changed()
        return out

    @app.delete("/admin/keys/{key_id}", response_model=KeyOut)
    def delete_key(key_id: str, admin: Admin) -> KeyOut:
        out = accounts.revoke_key(key_id, by=admin.id)
        changed()
        return out

    @app.get("/admin/status")
    def get_status(_: Admin) -> dict:
        return status() if status is not None else {}

    @app.get("/admin/changes")
    def get_changes(_: Admin, team: str | None = None, since: str | None = None) -> list[dict]:
        """What `sovereign audit changes` prints: who changed which team or key, and how, from the audit trail."""
        from gateway.audit_read import changes, parse_time

        return _from_trail(audit_url, lambda url: changes(url, team, parse_time(since, "since")))

    @app.get("/admin/usage")
    def get_usage(_: Admin, by: str = "team", since: str | None = None, until: str | None = None) -> list[dict]:
        """What `sovereign audit usage` prints: requests, errors and tokens per team, key, model, adapter, status,
        day or month (comma-separated `by`), from the audit trail."""
        from gateway.audit_read import parse_time
        from gateway.audit_usage import usage

        rows = _from_trail(audit_url, lambda url: usage(url, [g.strip() for g in by.split(",") if g.strip()],
                                                        parse_time(since, "since"), parse_time(until, "until")))
        return [r.as_dict() for r in rows]

    return app


def _from_trail(audit_url: str | None, read: Any) -> Any:
    """`read(audit_url)`, its AuditErrors as OpenAI-style errors: 404 without a trail, 400 naming a bad parameter."""
    from gateway.audit import AuditError

    if audit_url is None:
        raise E.GatewayError(404, "This gateway keeps no audit trail.", code="audit_not_found")
    try:
        return read(audit_url)
    except AuditError as exc:
        param = {"invalid_group": "by", "invalid_since": "since", "invalid_until": "until"}.get(exc.code)
        raise E.GatewayError(404 if exc.code == "audit_not_found" else 400, exc.message, code=exc.code,
                             param=param) from None
