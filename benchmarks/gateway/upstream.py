"""A fast, minimal OpenAI-shaped upstream for the gateway benchmark: answers instantly with canned completions.

    python benchmarks/gateway/upstream.py --port 9100 [--chunks 16]

POST /v1/chat/completions and /v1/completions (non-streaming JSON, or SSE with `"stream": true`: `--chunks` content
events, a usage event when `stream_options.include_usage` is set, then `data: [DONE]`), GET /v1/models, GET /health.
Raw asyncio + httptools (+ uvloop), so the fixture costs a few tens of microseconds per request and the figures
measure the proxies, not the upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httptools
import orjson

MODEL = "bench-model"


def _models() -> bytes:
    return orjson.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0,
                                                     "owned_by": "bench", "root": MODEL, "parent": None,
                                                     "max_model_len": 4096}]})


class Upstream(asyncio.Protocol):
    chunks = 16

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url, self.body = b"", []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        path = self.url.split(b"?", 1)[0]
        keep = self.parser.should_keep_alive()
        if path in (b"/v1/chat/completions", b"/v1/completions"):
            try:
                req = orjson.loads(b"".join(self.body) or b"{}")
            except orjson.JSONDecodeError:
                return self._send(400, b'{"error":{"message":"bad json","type":"invalid_request_error"}}', keep)
            chat = path == b"/v1/chat/completions"
            if req.get("stream"):
                return self._stream(req, chat, keep)
            return self._send(200, self._completion(req, chat), keep)
        if path == b"/v1/models":
            return self._send(200, _models(), keep)
        if path in (b"/health", b"/healthz"):
            return self._send(200, b"{}", keep)
        self._send(404, b'{"error":{"message":"not found","type":"invalid_request_error"}}', keep)

    def _send(self, status: int, body: bytes, keep: bool) -> None:
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}[status]
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
                             % (status, reason, len(body), b"" if keep else b"connection: close\r\n", body))
        if not keep:
            self.transport.close()

    def _completion(self, req: dict, chat: bool) -> bytes:
        n = self.chunks
        text = "tok " * n
        usage = {"prompt_tokens": 12, "completion_tokens": n, "total_tokens": 12 + n}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": "length", "logprobs": None}
            obj = "text_completion"
        return orjson.dumps({"id": "cmpl-bench", "object": obj, "created": int(time.time()),
                             "model": req.get("model", MODEL), "choices": [choice], "usage": usage})

    def _stream(self, req: dict, chat: bool, keep: bool) -> None:
        model = req.get("model", MODEL)
        obj = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())
        parts = [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                 b"transfer-encoding: chunked\r\n%s\r\n" % (b"" if keep else b"connection: close\r\n")]

        def event(payload: dict | bytes) -> None:
            data = payload if isinstance(payload, bytes) else orjson.dumps(payload)
            line = b"data: " + data + b"\n\n"
            parts.append(b"%x\r\n%s\r\n" % (len(line), line))

        for i in range(self.chunks):
            if chat:
                delta = {"role": "assistant", "content": "tok "} if i == 0 else {"content": "tok "}
                choice = {"index": 0, "delta": delta, "finish_reason": "length" if i == self.chunks - 1 else None}
            else:
                choice = {"index": 0, "text": "tok ", "finish_reason": "length" if i == self.chunks - 1 else None}
            event({"id": "cmpl-bench", "object": obj, "created": created, "model": model, "choices": [choice]})
        if (req.get("stream_options") or {}).get("include_usage"):
            event({"id": "cmpl-bench", "object": obj, "created": created, "model": model, "choices": [],
                   "usage": {"prompt_tokens": 12, "completion_tokens": self.chunks,
                             "total_tokens": 12 + self.chunks}})
        event(b"[DONE]")
        parts.append(b"0\r\n\r\n")
        self.transport.write(b"".join(parts))
        if not keep:
            self.transport.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, host, port, backlog=4096, reuse_address=True)
    print(f"upstream listening on http://{host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9100)
    ap.add_argument("--chunks", type=int, default=16, help="content events per streamed response")
    args = ap.parse_args()
    Upstream.chunks = args.chunks
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
