"""A fast fake vLLM (OpenAI protocol) for gateway unit tests: real HTTP, scripted behaviour, no model.

The answer echoes the last user text. Magic words in the prompt script failures: `__500__`, `__503__` (an HTTP error
before any byte), `__slow__` (headers only after `slow_s`), `__stall__` (one chunk, then silence), `__die__` (one
chunk, then the connection drops), `__trickle__` (0.2 s between chunks), `__vllm_error__` (a 400 in vLLM's own error shape), `__prefill__` (stream
headers, then nothing for `slow_s` unless the gateway hangs up: how long that took goes into `aborted_after`),
`__hold__` (a non-streamed answer only after `slow_s`, unless the gateway hangs up first: into `aborted_after` too).
`__ping__` (an SSE comment line before every stream chunk, as some servers send to keep a connection open).
`__tool__` (chat and Responses: the answer is a tool call instead of text), `__think__` (chat and Responses: a
reasoning model's thoughts come first, in `reasoning` or a reasoning item). `n` > 1 gives several choices.
`FakeUpstream.requests` keeps every body received, so tests can check what the gateway forwarded.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn


def _text_of(body: dict) -> str:
    if "input" in body and "model" in body and isinstance(body["input"], (str, list)) and "messages" not in body:
        inp = body["input"]
        if isinstance(inp, str):
            return inp
        for item in reversed(inp):
            if isinstance(item, dict) and item.get("role") == "user":
                c = item.get("content")
                return c if isinstance(c, str) else " ".join(p.get("text", "") for p in c if isinstance(p, dict))
        return ""
    if "messages" in body:
        for m in reversed(body["messages"]):
            if m.get("role") == "user":
                c = m.get("content")
                if isinstance(c, list):
                    return " ".join(p.get("text", "") for p in c if isinstance(p, dict))
                return c or ""
        return ""
    p = body.get("prompt", "")
    return p if isinstance(p, str) else " ".join(map(str, p))


@dataclass
class FakeUpstream:
    model: str = "fake-model"
    adapters: list[str] = field(default_factory=list)
    always_status: int | None = None  # e.g. 503: this replica refuses everything
    slow_s: float = 5.0
    embeddings: bool = True
    requests: list[dict[str, Any]] = field(default_factory=list)
    hits: int = 0
    aborted_after: list[float] = field(default_factory=list)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        if path == "/v1/models":
            data = [{"id": self.model, "object": "model", "created": 1, "owned_by": "vllm", "root": "/m",
                     "parent": None, "max_model_len": 2048}]
            data += [{"id": a, "object": "model", "created": 2, "owned_by": "vllm", "root": f"/adapters/{a}",
                      "parent": self.model} for a in self.adapters]
            return await self._json(send, 200, {"object": "list", "data": data})
        if path == "/health":
            return await self._json(send, 200, {})
        self.hits += 1
        req = orjson.loads(body) if body else {}
        self.requests.append(req)
        if self.always_status:
            return await self._json(send, self.always_status, {"error": {"message": "replica down", "type":
                                                                         "server_error", "code": None}})
        text = _text_of(req)
        if "__500__" in text:
            return await self._json(send, 500, {"error": {"message": "boom", "type": "server_error", "code": None}})
        if "__503__" in text:
            return await self._json(send, 503, {"error": {"message": "busy", "type": "server_error", "code": None}})
        if "__vllm_error__" in text:
            return await self._json(send, 400, {"object": "error", "message": "This model's maximum context length "
                                                "is 2048 tokens.", "type": "BadRequestError", "param": None,
                                                "code": 400})
        if "__slow__" in text:
            await asyncio.sleep(self.slow_s)
        if "__hold__" in text and not req.get("stream") and await self._hung_up(receive):  # a long generation
            return
        model = req.get("model", self.model)
        if model not in (self.model, *self.adapters):  # vLLM's answer for a model (an adapter) it does not serve
            return await self._json(send, 404, {"error": {"message": f"The model `{model}` does not exist.",
                                                          "type": "NotFoundError", "param": "model", "code": 404}})
        if path == "/v1/embeddings":
            if not self.embeddings:  # what vLLM's server answers when its model is not an embeddings model
                return await self._json(send, 404, {"detail": "Not Found"})
            inputs = req.get("input")
            inputs = [inputs] if isinstance(inputs, str) else inputs
            n = sum(len(str(i).split()) for i in inputs)
            return await self._json(send, 200, {"object": "list", "model": model, "data": [
                {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))],
                "usage": {"prompt_tokens": n, "total_tokens": n}})
        if path == "/v1/responses":
            return await self._responses(send, req, text, model)
        chat = path == "/v1/chat/completions"
        words = ("Echo: " + text).split()[: req.get("max_tokens") or req.get("max_completion_tokens") or 64]
        prompt_tokens = max(1, len(text.split()))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                 "total_tokens": prompt_tokens + len(words)}
        rid, created = f"cmpl-{self.hits}", int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        # `__tool__`: the answer is a call of the tool `lookup_order` with the echo as its argument, shaped as vLLM
        # sends one: the whole call in the message, or streamed as the call's name, then its arguments in pieces.
        tool_args = orjson.dumps({"query": " ".join(words)}).decode() if chat and "__tool__" in text else None
        n = req.get("n") if isinstance(req.get("n"), int) else 1  # choice k > 0 marks each of its words with k
        # `__think__`: a reasoning model behind a reasoning parser: its thoughts in `reasoning`, apart from the answer
        thought = ("Thinking about: " + text).split() if chat and "__think__" in text else []
        if not req.get("stream"):
            choices = []
            for k in range(n):
                content = " ".join(w + str(k or "") for w in words)
                message = {"role": "assistant", "content": content}
                if thought:
                    message["reasoning"] = " ".join(w + str(k or "") for w in thought)
                choices.append({"index": k, "message": message, "finish_reason": "stop"} if chat
                               else {"index": k, "text": content, "finish_reason": "stop"})
            if tool_args is not None:
                choices = [{"index": 0, "finish_reason": "tool_calls", "message": {
                    "role": "assistant", "content": None, "tool_calls": [
                        {"id": "call_1", "type": "function",
                         "function": {"name": "lookup_order", "arguments": tool_args}}]}}]
            return await self._json(send, 200, {"id": rid, "object": obj, "created": created, "model": model,
                                                "choices": choices, "usage": usage})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        obj += ".chunk" if chat else ""
        if "__split__" in text:  # every event cut into 7-byte pieces, each its own write: events span reads
            send = _split_sender(send)
        if "__prefill__" in text and await self._hung_up(receive):  # a queued or long prefill: no token yet
            return

        def event(payload: dict) -> dict:
            return {"type": "http.response.body", "body": b"data: " + orjson.dumps(payload) + b"\n\n",
                    "more_body": True}

        if tool_args is not None:
            deltas = [{"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                           "function": {"name": "lookup_order", "arguments": ""}}]}]
            deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": tool_args[i:i + 5]}}]}
                       for i in range(0, len(tool_args), 5)]
        else:
            deltas = [{"reasoning": w if i == 0 else " " + w} for i, w in enumerate(thought)]
            deltas += [{"content": w} if i == 0 else {"content": " " + w} for i, w in enumerate(words)]
            deltas[0]["role"] = "assistant"
        for i, delta in enumerate(deltas):
            if "__ping__" in text:
                await send({"type": "http.response.body", "body": b": ping\n\n", "more_body": True})
            for k in range(n if tool_args is None else 1):  # several choices interleave, a piece each in turn
                field_ = "reasoning" if "reasoning" in delta else "content"
                piece = {**delta, field_: delta[field_] + str(k)} if k else delta
                choice = ({"index": k, "delta": piece, "finish_reason": None} if chat
                          else {"index": k, "text": piece[field_], "finish_reason": None})
                await send(event({"id": rid, "object": obj, "created": created, "model": model,
                                  "choices": [choice]}))
            if "__die__" in text and i == 1:
                raise RuntimeError("fake upstream drops the connection mid-stream")
            if "__stall__" in text and i == 1:
                await asyncio.sleep(self.slow_s)
            if "__trickle__" in text:
                await asyncio.sleep(0.2)
        last = {"index": 0, "delta": {}, "finish_reason": "tool_calls" if tool_args else "stop"} if chat else \
            {"index": 0, "text": "", "finish_reason": "stop"}
        await send(event({"id": rid, "object": obj, "created": created, "model": model, "choices": [last]}))
        if (req.get("stream_options") or {}).get("include_usage"):
            await send(event({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                              "usage": usage}))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def _hung_up(self, receive) -> bool:
        """Wait up to slow_s for the gateway to hang up (how long it took goes into `aborted_after`)."""
        t = time.monotonic()
        try:
            message = await asyncio.wait_for(receive(), self.slow_s)
        except TimeoutError:
            return False
        if message["type"] != "http.disconnect":
            return False
        self.aborted_after.append(time.monotonic() - t)
        return True

    async def _responses(self, send, req: dict, text: str, model: str) -> None:
        """The Responses API as vLLM serves it: a response object, or typed events ending in response.completed."""
        words = ("Echo: " + text).split()[: req.get("max_output_tokens") or 64]
        content = " ".join(words)
        usage = {"input_tokens": max(1, len(text.split())), "output_tokens": len(words),
                 "total_tokens": max(1, len(text.split())) + len(words)}
        response = {"id": f"resp_{self.hits}", "object": "response", "created_at": int(time.time()), "model": model,
                    "status": "completed", "output": [{"id": "msg_1", "type": "message", "role": "assistant",
                                                       "status": "completed", "content": [
                                                           {"type": "output_text", "text": content,
                                                            "annotations": []}]}], "usage": usage}
        thought = "Thinking about: " + text
        if "__think__" in text:  # a reasoning item before the message, as vLLM's reasoning parser gives one
            response["output"].insert(0, {"id": "rs_1", "type": "reasoning", "summary": [], "status": "completed",
                                          "content": [{"type": "reasoning_text", "text": thought}]})
        call = None
        if "__tool__" in text:  # a function call item instead of a message
            call = {"id": "fc_1", "type": "function_call", "call_id": "call_1", "name": "lookup_order",
                    "arguments": orjson.dumps({"query": content}).decode(), "status": "completed"}
            response["output"] = [call]
        if not req.get("stream"):
            return await self._json(send, 200, response)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        seq = iter(range(1000))
        await send(_typed_event(seq, "response.created", {"response": {**response, "status": "in_progress",
                                                                        "output": [], "usage": None}}))
        if call is not None:
            await send(_typed_event(seq, "response.output_item.added", {"output_index": 0, "item": {
                **call, "arguments": "", "status": "in_progress"}}))
            args = call["arguments"]
            for i in range(0, len(args), 5):
                await send(_typed_event(seq, "response.function_call_arguments.delta", {
                    "item_id": "fc_1", "output_index": 0, "delta": args[i:i + 5]}))
            await send(_typed_event(seq, "response.function_call_arguments.done", {
                "item_id": "fc_1", "output_index": 0, "arguments": args}))
            await send(_typed_event(seq, "response.output_item.done", {"output_index": 0, "item": call}))
        else:
            if "__think__" in text:
                for i, w in enumerate(thought.split()):
                    await send(_typed_event(seq, "response.reasoning_text.delta", {
                        "item_id": "rs_1", "output_index": 0, "content_index": 0, "delta": w if i == 0 else " " + w}))
            for i, w in enumerate(words):
                await send(_typed_event(seq, "response.output_text.delta", {
                    "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": w if i == 0 else " " + w}))
                if "__die__" in text and i == 1:
                    raise RuntimeError("fake upstream drops the connection mid-stream")
            await send(_typed_event(seq, "response.output_text.done", {
                "item_id": "msg_1", "output_index": 0, "content_index": 0, "text": content}))
        await send(_typed_event(seq, "response.completed", {"response": response}))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _json(send, status: int, payload: dict) -> None:
        body = orjson.dumps(payload)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _typed_event(seq, kind: str, payload: dict) -> dict:
    """One event of a Responses stream, numbered from `seq`."""
    body = orjson.dumps({**payload, "type": kind, "sequence_number": next(seq)})
    return {"type": "http.response.body", "body": b"event: " + kind.encode() + b"\ndata: " + body + b"\n\n",
            "more_body": True}


def _split_sender(send):
    async def split_send(message: dict) -> None:
        body, more = message.get("body", b""), message.get("more_body", False)
        for i in range(0, len(body), 7):
            await send({"type": "http.response.body", "body": body[i:i + 7], "more_body": True})
            await asyncio.sleep(0.001)
        if not more:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    return split_send


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """Run an ASGI app under uvicorn in a daemon thread (the httpx test-suite pattern)."""

    def __init__(self, app, port: int | None = None, lifespan: str = "on", tls: tuple[str, str] | None = None,
                 http: Any = "httptools") -> None:
        self.port = port or free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        cert, key = tls or (None, None)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False, lifespan=lifespan, loop="asyncio",
                                                    http=http, ssl_certfile=cert, ssl_keyfile=key,
                                                    proxy_headers=False))  # as `sovereign gateway` serves
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
