"""The gateway's uvicorn protocol writes a response's head with its body's first part: one write per JSON answer."""

from __future__ import annotations

import asyncio

from uvicorn.config import Config
from uvicorn.server import ServerState

from gateway.http_protocol import CoalescingHttpToolsProtocol


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _exchange(app, request: bytes, settle: float = 0.05) -> _Transport:
    config = Config(app=app, http=CoalescingHttpToolsProtocol, lifespan="off", log_config=None)
    protocol = CoalescingHttpToolsProtocol(config=config, server_state=ServerState(), app_state={},
                                           _loop=asyncio.get_running_loop())
    transport = _Transport()
    protocol.connection_made(transport)
    protocol.data_received(request)
    await asyncio.sleep(settle)
    return transport


GET = b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n"


def test_a_json_answer_is_one_write_with_head_and_body():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})

    writes = asyncio.run(_exchange(app, GET)).writes
    assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 200 OK") and writes[0].endswith(b"\r\n\r\n{}")


def test_an_empty_body_part_sends_the_head_at_once_and_streams_follow():
    release = asyncio.Event()

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": True})
        await release.wait()
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def main():
        t = await _exchange(app, GET)
        head_only = list(t.writes)
        release.set()
        await asyncio.sleep(0.05)
        return head_only, t.writes

    head_only, writes = asyncio.run(main())
    assert len(head_only) == 1 and head_only[0].startswith(b"HTTP/1.1 200 OK") and head_only[0].endswith(b"\r\n\r\n")
    assert b"data: 1" in writes[1] and writes[-1].endswith(b"0\r\n\r\n")


def test_an_app_failing_after_its_head_gets_a_clean_500():
    # The head was held, never written: uvicorn's own 500 replaces it instead of breaking the connection mid-answer.
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        raise RuntimeError("boom")

    writes = asyncio.run(_exchange(app, GET)).writes
    assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 500") and writes[0].endswith(b"Internal Server Error")


def test_connection_close_answers_are_written_before_the_close():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    t = asyncio.run(_exchange(app, b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"))
    assert len(t.writes) == 1 and t.writes[0].endswith(b"ok") and t.closed


def test_a_uvicorn_without_the_internals_it_subclasses_still_serves_with_its_own_protocol(monkeypatch, caplog):
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from gateway.app import _http_protocol

    assert _http_protocol() is CoalescingHttpToolsProtocol  # the uvicorn this project installs
    monkeypatch.delattr(HttpToolsProtocol, "_start_asgi_task")
    assert _http_protocol() == "httptools"
    assert "coalescing protocol" in caplog.text
