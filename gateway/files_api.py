"""OpenAI's `/v1/files` for fine-tuning data: upload (multipart, purpose `fine-tune`), list, retrieve, delete, content.

A team sees only its own files; another team's file id answers 404 like a missing one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from gateway import errors as E
from gateway.caller import Caller
from gateway.file_store import FileStore, file_object, paginate


def build_files_router(store: FileStore, file_in_use: Callable[[str, str], str | None]) -> APIRouter:
    """`file_in_use(file_id, team)` names an unfinished job that reads the file, or None."""
    router = APIRouter()

    @router.post("/v1/files")
    async def upload(request: Request, entry: Caller, file: Annotated[UploadFile, File()],
                     purpose: Annotated[str, Form()]) -> dict:
        meta = await asyncio.to_thread(store.create, file.file, filename=file.filename or "upload.jsonl",
                                       purpose=purpose, owner=entry.team.name)
        return file_object(meta)

    @router.get("/v1/files")
    async def list_files(entry: Caller, purpose: str | None = None,
                         limit: Annotated[int, Query(ge=1, le=10000)] = 10000, after: str | None = None,
                         order: Literal["asc", "desc"] = "desc") -> dict:
        metas = await asyncio.to_thread(lambda: list(store.iter_owned(entry.team.name)))
        if purpose is not None:
            metas = [m for m in metas if m.get("purpose") == purpose]
        metas.sort(key=lambda m: (m["created_at"], m.get("created_ns", 0), m["id"]), reverse=order == "desc")
        return paginate([file_object(m) for m in metas], after, limit)

    @router.get("/v1/files/{file_id}")
    async def retrieve(file_id: str, entry: Caller) -> dict:
        return file_object(store.get(file_id, entry.team.name))

    @router.delete("/v1/files/{file_id}")
    async def delete(file_id: str, entry: Caller) -> dict:
        store.get(file_id, entry.team.name)
        job = await asyncio.to_thread(file_in_use, file_id, entry.team.name)
        if job is not None:
            raise E.GatewayError(409, f"File {file_id} is the data of fine-tuning job {job}, which has not finished; "
                                      f"cancel the job or wait for it before deleting the file.",
                                 code="file_in_use", param="file_id")
        await asyncio.to_thread(store.delete, file_id, entry.team.name)
        return {"id": file_id, "object": "file", "deleted": True}

    @router.get("/v1/files/{file_id}/content")
    async def content(file_id: str, entry: Caller) -> FileResponse:
        meta = store.get(file_id, entry.team.name)
        return FileResponse(store.data_path(file_id), media_type="application/octet-stream",
                            filename=meta["filename"])

    return router
