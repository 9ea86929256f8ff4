"""A lean pooled HTTP/1.1 client for the request path: asyncio protocol + httptools' response parser.

Why not aiohttp or httpx: measured on the 2-core dev box, aiohttp's client spent ~300 µs of CPU per proxied request,
more than half of the gateway's whole budget. The replicas are vLLM servers we run ourselves speaking HTTP/1.1 (plain,
or TLS through asyncio's own SSL transport for https:// replicas), so a client that only needs keep-alive pooling,
Content-Length and chunked bodies, and streaming reads is small. Health probes and anything off the hot path keep
using aiohttp.

Errors: `UpstreamConnectError` when nothing of the response arrived (safe to retry on another replica),
`UpstreamBrokenError` when the response broke off after it started.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from urllib.parse import urlsplit

import httptools
import orjson

_MAX_BUFFER = 1 << 20  # pause reading from the replica past this much unread body


class UpstreamError(Exception):
    pass


class UpstreamConnectError(UpstreamError):
    """Failed before any byte of the response: the request may be retried elsewhere."""


class UpstreamBrokenError(UpstreamError):
    """The response started and then broke off."""


class _Connection(asyncio.Protocol):
    __slots__ = ("pool", "transport", "parser", "response", "closed", "keep_alive", "_headers")

    def __init__(self, pool: "Pool") -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.closed = False
        self.keep_alive = True
        self._headers: list[tuple[bytes, bytes]] = []

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # pragma: no cover - replicas never upgrade
            self._fail(UpstreamBrokenError("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamBrokenError(f"malformed response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        resp = self.response
        if resp is not None and not resp.complete:
            if resp.status == 0:
                resp._error(UpstreamConnectError(f"connection closed before the response ({exc or 'EOF'})"))
            else:
                resp._error(UpstreamBrokenError(f"connection closed mid-response ({exc or 'EOF'})"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        resp = self.response
        if resp is None:
            return
        resp.status = self.parser.get_status_code()
        resp.headers = self._headers
        self._headers = []
        self.keep_alive = self.parser.should_keep_alive()
        resp._wake()

    def on_body(self, body: bytes) -> None:
        resp = self.response
        if resp is not None:
            resp._chunks.append(body)
            resp._buffered += len(body)
            if resp._buffered > _MAX_BUFFER and self.transport is not None:
                self.transport.pause_reading()
            resp._wake()

    def on_message_complete(self) -> None:
        resp = self.response
        if resp is not None:
            resp.complete = True
            resp._wake()

    def _fail(self, exc: UpstreamError) -> None:
        if self.response is not None:
            self.response._error(exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Response:
    __slots__ = ("conn", "status", "headers", "complete", "_chunks", "_buffered", "_waiter", "_exc", "_released")

    def __init__(self, conn: _Connection) -> None:
        self.conn = conn
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future | None = None
        self._exc: Exception | None = None
        self._released = False

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _error(self, exc: Exception) -> None:
        self._exc = exc
        w = self._waiter
        if w is not None and not w.done():
            w.set_exception(exc)

    async def _wait(self) -> None:
        if self._exc is not None:
            raise self._exc
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def _start(self) -> None:
        while self.status == 0:
            await self._wait()

    def ready(self) -> bool:
        """Whether `readany` (and `read`, once complete) would return without waiting."""
        return bool(self._chunks) or self.complete or self._exc is not None

    async def readany(self) -> bytes:
        """The next piece of body; b"" once the body is complete."""
        while not self._chunks:
            if self.complete:
                return b""
            await self._wait()
        data = self._take()
        self._buffered = 0
        self._resume()
        return data

    def _take(self) -> bytes:
        """Everything buffered, as one piece (a chunked body arrives as one buffered piece per chunk)."""
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        return data

    async def read(self) -> bytes:
        """The whole body. Unbounded by design (the back-pressure of `on_body` is for streams: a JSON answer is
        needed whole), so reading goes on past the stream buffer's limit."""
        while not self.complete:
            self._resume()
            await self._wait()
        return self._take()

    def _resume(self) -> None:
        if self.conn.transport is not None and not self.conn.closed:
            self.conn.transport.resume_reading()

    def release(self) -> None:
        """Give the connection back for reuse if the exchange finished cleanly, else close it."""
        if self._released:
            return
        self._released = True
        conn = self.conn
        conn.response = None
        if self.complete and conn.keep_alive and not conn.closed and self._exc is None:
            self._resume()  # a read that crossed the buffer limit paused it: pooled paused, the next answer would hang
            conn.pool._put(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Drop the connection (a replica stops generating when the client goes away)."""
        self._released = True
        self.conn.response = None
        self.conn.close()


class Pool:
    """Keep-alive connections to one replica (scheme http, host, port)."""

    def __init__(self, url: str, *, connect_timeout: float = 5.0, max_idle: int = 256,
                 tls: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(url)
        self.url = url
        self.connect_timeout = connect_timeout
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"replica URL {url!r}: only http:// and https:// are supported")
        self.host = parts.hostname or "127.0.0.1"
        self.tls = (tls or ssl.create_default_context()) if parts.scheme == "https" else None
        self.port = parts.port or (443 if self.tls else 80)
        self.base_path = parts.path.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal is bracketed (RFC 7230)
        self._host_header = f"{host}:{self.port}".encode()
        self._idle: list[_Connection] = []
        self.max_idle = max_idle

    def _put(self, conn: _Connection) -> None:
        if len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            conn.close()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: _Connection(self), self.host, self.port, ssl=self.tls)
        except TimeoutError:
            raise UpstreamConnectError(f"connecting to {self.host}:{self.port} took over "
                                       f"{self.connect_timeout:g} s") from None
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        return conn

    async def request(self, method: str, path: str, body: bytes, headers: bytes = b"") -> Response:
        """Send a request and return once the response's status and headers arrived.

        A pooled connection the replica closed meanwhile is retried once on a fresh one (nothing was processed).
        """
        head = (f"{method} {self.base_path}{path} HTTP/1.1\r\n".encode() + b"Host: " + self._host_header +
                b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n" + headers + b"\r\n")
        for attempt in (0, 1):
            conn = None
            # A second try never takes another pooled connection: the replica (uvicorn closes idle ones after 5 s)
            # tends to close them together, so the next one would be as stale.
            while self._idle and attempt == 0:
                candidate = self._idle.pop()
                if not candidate.closed:
                    conn = candidate
                    break
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            resp = Response(conn)
            conn.response = resp
            conn.transport.write(head + body)
            try:
                await resp._start()
                return resp
            except UpstreamConnectError:
                conn.close()
                if not reused or attempt == 1:
                    raise
            except BaseException:  # cancelled (a timeout) or broken: this connection's state is unknown
                conn.close()
                raise
        raise UpstreamConnectError(f"cannot reach {self.host}:{self.port}")  # pragma: no cover

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


def event_json(event: bytes) -> dict | None:
    """The JSON object of one server-sent event (`data: {...}`, after an `event:` line or not), or None."""
    start = event.find(b"{")
    if start < 0:
        return None
    try:
        obj = orjson.loads(event[start:])
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None
