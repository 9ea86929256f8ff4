"""The /v1 request path: a lean ASGI handler (orjson, pooled keep-alive upstream connections, no database, no
pydantic).

Order of checks, so each failure has one clear answer: key (401) → body size (413) → JSON and types (400) → model
known (404) → model allowed (403) → policy (400 content_policy_violation) → quota (429) → a healthy replica (503) →
upstream timeouts (504). Upstream errors before the first byte are retried on another replica; after streaming has
started a failure becomes an in-band SSE error event, never a clean-looking end.

Streaming asks the upstream for `stream_options.include_usage` so quotas settle on real usage, and drops the extra
usage chunk again when the client did not ask for it. The audit record is durable before the last byte is sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

from gateway import errors as E
from gateway import responses_api
from gateway.audit import AuditRecord
from gateway.caller import note_keyless_refusal
from gateway.chat_api import ChatEvents, choices_texts
from gateway.client_watch import ClientWatch
from gateway.config import GatewayConfig
from gateway.directory import Directory, KeyEntry
from gateway.job_runner import WITHDRAWN
from gateway.metrics import GatewayMetrics
from gateway.policy import PolicyOutcome, apply_policy
from gateway.quotas import QuotaExceeded, QuotaUnavailable
from gateway.request_checks import bearer, content_length, validate
from gateway.routing import Replica, Router
from gateway.upstream import Pool, Response, UpstreamBrokenError, UpstreamError

log = logging.getLogger("sovereign.gateway.access")

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]
UPSTREAM_HEADERS = b"Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
RETRY_STATUSES = (502, 503)


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


class Exchange:
    """Per-request state, slotted: what the audit record, the quota settlement and the metrics need."""

    __slots__ = ("rid", "t0", "entry", "kind", "model", "base", "adapter", "stream", "status", "prompt_tokens",
                 "completion_tokens", "ttft", "decisions", "prompt_text", "completion_parts", "other_choices",
                 "reasoning_parts", "reservation", "upstream_s", "audit_s", "rate_headers", "replica", "first_byte_by")

    def __init__(self, rid: str, t0: float, entry: KeyEntry | None, kind: str) -> None:
        self.rid = rid
        self.t0 = t0
        self.entry = entry
        self.kind = kind
        self.model = self.base = ""
        self.adapter: str | None = None
        self.stream = False
        self.status = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft: float | None = None
        self.decisions: dict[str, Any] = {}
        self.prompt_text: str | None = None
        self.completion_parts: list[str] | None = None  # the answer's text for the audit (its first choice's)
        self.other_choices: dict[int, list[str]] | None = None  # n > 1, several prompts: the other choices' text
        self.reasoning_parts: dict[int, list[str]] | None = None  # a reasoning parser's text, by choice
        self.reservation: Any = None
        self.upstream_s = 0.0
        self.audit_s = 0.0
        self.rate_headers: list[tuple[bytes, bytes]] = []
        self.replica = ""
        self.first_byte_by = 0.0  # loop time by which a stream's first byte must come: one TTFT limit, not two

    def reasoning(self, index: Any = 0) -> list[str]:
        """Where the audit collects a choice's reasoning: what a reasoning model thought, apart from its answer."""
        if self.reasoning_parts is None:
            self.reasoning_parts = {}
        return self.reasoning_parts.setdefault(index if type(index) is int else 0, [])


def _discard(ex: Exchange, replica: Replica, resp: Response) -> None:
    """An upstream answer that is not relayed (another attempt follows): its connection, count and time go back."""
    resp.release()
    replica.outstanding -= 1
    ex.upstream_s += time.perf_counter()


class Proxy:
    def __init__(self, config: GatewayConfig, directory: Directory, router: Router, metrics: GatewayMetrics,
                 quotas: Any = None, audit: Any = None) -> None:
        self.config = config
        self.directory = directory
        self.router = router
        self.metrics = metrics
        self.quotas = quotas
        self.audit = audit
        self.session: aiohttp.ClientSession | None = None  # health probes and other cold paths
        # One TLS context for the hot path and the probes, trusting the configured CA (or the system's).
        self.tls = ssl.create_default_context(cafile=config.replica_ca_file and str(config.replica_ca_file))
        self.pools = {url: Pool(url, connect_timeout=config.timeouts.connect, tls=self.tls)  # the hot path
                      for url in router.replicas}
        self.inflight = 0
        # model -> the team whose fine-tune job made it, None otherwise (gateway.fine_tuning replaces it).
        self.owner: Callable[[str], str | None] = lambda model: None
        t = config.timeouts
        self._ttft, self._stall, self._total = t.ttft, t.stall, t.total

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300, ssl=self.tls)
        t = self.config.timeouts
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                             timeout=aiohttp.ClientTimeout(total=t.total, sock_connect=t.connect),
                                             skip_auto_headers=("User-Agent",))

    async def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        if self.session is not None:
            await self.session.close()

    # entry -----------------------------------------------------------------------------------------------------
    async def __call__(self, scope: dict, receive, send) -> None:
        t0 = time.perf_counter()
        path, method = scope["path"], scope["method"]
        kind = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
                "/v1/embeddings": "embeddings", "/v1/responses": "responses"}.get(path)
        ex = Exchange("req_" + os.urandom(12).hex(), t0, None, kind or "models")
        try:
            if kind is None and not path.startswith("/v1/models"):
                if path.startswith("/v1/responses/"):
                    raise E.GatewayError(404, f"Responses are not stored on this platform, so there is nothing at "
                                              f"{path}.", code="response_not_found")
                raise E.not_found(path)
            expected = "GET" if kind is None else "POST"
            if method != expected:
                raise E.method_not_allowed(method, path)
            secret = bearer(scope)
            entry = self.directory.lookup(secret) if secret else None
            if entry is None:
                raise self.directory.refusal(secret)
            if entry.networks is not None:
                self.directory.origins.check(entry, scope)
            ex.entry = entry
            if kind is None:
                await self._models(scope, send, ex)
                return
            self.inflight += 1  # the gauge is set from this at scrape time: no lock per request
            try:
                await self._generate(scope, receive, send, ex)
            finally:
                self.inflight -= 1
        except E.GatewayError as exc:
            ex.status = exc.status
            if ex.entry is None and (refused := getattr(exc, "refused_key", None)) is not None:
                # Audited, counted and logged under its key and team: after a rotation or a revocation, which app
                # still calls with the old key is then in the trail, the metrics and the access log.
                ex.entry = refused
            elif exc.status == 401 and ex.entry is None:
                note_keyless_refusal(scope, bearer(scope))
            blocked = getattr(exc, "decisions", None)
            if blocked and ex.entry is not None:
                ex.decisions.update(blocked)
                self._count_policy(ex.entry.team.name, blocked)
            if ex.entry is not None and kind is not None and exc.code != "audit_unavailable":
                try:
                    await self._audit(ex, error=exc.openai_code or exc.type)
                except E.GatewayError:
                    pass  # already logged; the refusal itself still goes out
            await self._send_error(send, exc, ex)
        except ClientGone:
            ex.status = 499
        finally:
            self._observe(ex)

    # /v1/models ------------------------------------------------------------------------------------------------
    async def _models(self, scope: dict, send, ex: Exchange) -> None:
        policy = ex.entry.team
        cards = [c for c in self.router.model_cards() if self._allows(policy, c["id"])]
        for name, versions in self.router.aliases():
            latest = next((v for v in versions if self._allows(policy, v)), None)
            if latest is not None:  # the bare name, as a card of its newest version this team may call
                card = next(c for c in cards if c["id"] == latest)
                cards.append({**card, "id": name, "resolves_to": latest})
        path = scope["path"]
        if path in ("/v1/models", "/v1/models/"):
            payload: dict[str, Any] = {"object": "list", "data": cards}
        else:
            wanted = path[len("/v1/models/"):]
            card = next((c for c in cards if c["id"] == wanted), None)
            if card is None:
                raise E.model_not_found(wanted)
            payload = card
        ex.status = 200
        await _respond(send, 200, orjson.dumps(payload), JSON_HEADERS, ex.rid)

    # /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses ------------------------------------
    async def _generate(self, scope: dict, receive, send, ex: Exchange) -> None:
        entry = ex.entry
        raw = await self._read_body(scope, receive)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise E.invalid_request(f"The request body is not valid JSON: {exc}"[:300]) from None
        ex.model = model = validate(body, ex.kind)
        alias = None
        route = self.router.resolve(model)
        if route is None and not self.router.versions(model):
            await self.router.refresh_on_miss()
            route = self.router.resolve(model)
        if route is None and self.router.versions(model):
            alias = model
            candidates = self._route_alias(ex, body, alias)
        else:
            if route is None:
                raise E.model_not_found(model)
            ex.base, ex.adapter, candidates = route
            if not self._allows(entry.team, model):
                raise self._refused(model, entry.team.name)
        outcome: PolicyOutcome = apply_policy(entry.team, body, ex.kind)
        ex.decisions = outcome.decisions
        self._count_policy(entry.team.name, outcome.decisions)
        ex.prompt_text = outcome.prompt_text
        # Embeddings have no stream: a client's `stream: true` there gets the plain JSON answer the server sends.
        ex.stream = stream = ex.kind != "embeddings" and body.get("stream") is True
        client_wants_usage = False
        if stream and ex.kind != "responses":  # a Responses stream reports usage in its final event anyway
            so = body.get("stream_options") or {}
            client_wants_usage = so.get("include_usage") is True
            if not client_wants_usage:
                body["stream_options"] = {**so, "include_usage": True}
        if entry.team.audit_content != "none":
            ex.completion_parts = []
        if self.inflight > self.config.max_inflight:
            raise E.overloaded(f"The gateway has {self.inflight} requests in flight; retry shortly.")

        estimate = len(outcome.prompt_text) // 3 + outcome.token_ids + 8
        if entry.quota_subjects and self.quotas is not None:
            per_choice = outcome.max_tokens or (0 if ex.kind == "embeddings"
                                                else self.config.default_max_tokens_reservation)
            # Each of n choices (best_of candidates, where a server still takes them) may use max_tokens.
            choices = 1 if ex.kind in ("embeddings", "responses") else max(
                body.get("n") or 1, body.get("best_of") if type(body.get("best_of")) is int else 1)
            await self._reserve(ex, estimate + per_choice * choices)
        ex.prompt_tokens = estimate  # replaced by the upstream's count when it reports usage
        try:
            try:
                payload = orjson.dumps(body)
            except orjson.JSONEncodeError:  # parsed (orjson reads 1,024 levels) but not re-encodable (it writes 255)
                raise E.invalid_request("The request body is nested more than 255 levels deep.") from None
            # A stream learns of a client that leaves from its own relay; a whole answer needs a watch.
            watch = None if stream else ClientWatch(receive, lambda: ex.status == 0)
            try:
                replica, resp = await self._open_upstream(ex, candidates, scope["path"], payload)
                while resp.status == 404 and alias is not None and ex.model not in (
                        left := self.router.versions(alias)) and left:
                    # The version the bare name chose was unloaded since the last health poll (removed): the
                    # replica's 404 took it out of the routes, so the next newest version answers instead.
                    _discard(ex, replica, resp)
                    candidates = self._route_alias(ex, body, alias)
                    replica, resp = await self._open_upstream(ex, candidates, scope["path"], orjson.dumps(body))
                try:
                    if resp.status != 200:
                        await self._relay_upstream_error(send, ex, resp, scope["path"])
                    elif stream:
                        events = (responses_api.ResponseEvents(ex) if ex.kind == "responses"
                                  else ChatEvents(ex, client_wants_usage))
                        await self._relay_stream(receive, send, ex, resp, events)
                    else:
                        await self._relay_json(send, ex, resp)
                finally:
                    replica.outstanding -= 1
                    resp.release()  # closes the connection when the answer is unfinished: vLLM then aborts it
            except asyncio.CancelledError:
                if watch is None or not watch.gone:
                    raise
                asyncio.current_task().uncancel()
                await self._client_left(ex)
            finally:
                if watch is not None:
                    watch.stop()
        finally:
            if ex.reservation is not None:
                # Bill only what the model actually processed: nothing if it never started answering.
                used = ex.prompt_tokens + ex.completion_tokens if ex.ttft is not None else 0
                try:
                    await self.quotas.settle(ex.reservation, used)
                except QuotaUnavailable as exc:  # the answer is already out; the reservation stays charged
                    log.warning("quota settle failed", extra={"error": exc.message})

    def _route_alias(self, ex: Exchange, body: dict, alias: str) -> list[Replica]:
        """A bare adapter name means its newest version this team may call: apps keep calling `support` while new
        versions are published (and an old one is back once a bad one is removed). Rewrites the body's model."""
        versions = self.router.versions(alias)
        ex.model = body["model"] = next((v for v in versions if self._allows(ex.entry.team, v)), versions[0])
        ex.base, ex.adapter, candidates = self.router.resolve(ex.model)
        if not self._allows(ex.entry.team, ex.model):
            raise self._refused(ex.model, ex.entry.team.name)
        return candidates

    def _refused(self, model: str, team: str) -> E.GatewayError:
        owner = self.owner(model)
        return E.model_withdrawn(model) if owner == WITHDRAWN else E.model_not_allowed(model, team, owner)

    def _allows(self, team: Any, model: str) -> bool:
        owner = self.owner(model)
        if owner is None:
            return team.allows(model)
        return owner != WITHDRAWN and (owner == team.name or team.names(model))

    async def _read_body(self, scope: dict, receive) -> bytes:
        limit = self.config.max_body_bytes
        declared = content_length(scope)
        if declared is not None and declared > limit:
            raise E.body_too_large(limit)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise E.body_too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _reserve(self, ex: Exchange, tokens: int) -> None:
        try:
            ex.reservation = await self.quotas.reserve(ex.entry.quota_subjects, tokens)
        except QuotaUnavailable as exc:
            # Without the shared counters no limit can be enforced: refuse rather than let traffic through unmetered.
            raise E.overloaded(exc.message) from None
        except QuotaExceeded as exc:
            self.metrics.quota_rejections.labels(ex.entry.team.name, exc.kind).inc()
            headers = {k: str(v) for k, v in (exc.headers or {}).items()}
            if exc.insufficient_quota:
                raise E.GatewayError(429, exc.message, type="insufficient_quota", code="insufficient_quota",
                                     headers=headers) from None
            raise E.GatewayError(429, exc.message, type="tokens" if "token" in exc.kind else "requests",
                                 code="rate_limit_exceeded", headers=headers) from None
        ex.rate_headers = [(k.lower().encode(), str(v).encode()) for k, v in ex.reservation.headers().items()]

    async def _open_upstream(self, ex: Exchange, candidates: list[Replica], path: str,
                             payload: bytes) -> tuple[Replica, Response]:
        """POST to the least-loaded healthy replica; on a failure before the first byte, try another."""
        tried: list[Replica] = []
        last_error = ""
        # A non-streamed answer arrives whole, headers last: only the total limit can apply to it. A stream's headers
        # and first token share one TTFT deadline, across retries.
        ex.first_byte_by = asyncio.get_running_loop().time() + (self._ttft if ex.stream else self._total)
        for attempt in range(self.config.retries + 1):
            replica = self.router.pick(candidates, tried)
            if replica is None:
                break
            replica.outstanding += 1
            t_up = time.perf_counter()
            try:
                async with asyncio.timeout_at(ex.first_byte_by):
                    resp = await self.pools[replica.url].request("POST", path, payload, UPSTREAM_HEADERS)
            except TimeoutError:
                replica.outstanding -= 1
                self.metrics.upstream_errors.labels(replica.url, "ttft_timeout").inc()
                raise E.upstream_timeout(f"The model did not start answering within {self._ttft:g} s." if ex.stream
                                         else f"The model did not answer within {self._total:g} s.") from None
            except UpstreamError as exc:  # nothing of an answer arrived: safe to try another replica
                replica.outstanding -= 1
                last_error = f"{type(exc).__name__}: {exc}"
                self.router.mark_failed(replica, last_error[:300])
                self.metrics.upstream_errors.labels(replica.url, "connect").inc()
                tried.append(replica)
                continue
            except BaseException:  # cancelled: the count must not drift, or least-outstanding shuns this replica
                replica.outstanding -= 1
                raise
            ex.upstream_s -= t_up  # closed when the last upstream byte arrives
            ex.replica = replica.url
            if resp.status == 404 and ex.adapter is not None:
                # The replica no longer serves the adapter (unloaded since the last poll): route nothing more to it
                # for the adapter, and try a replica that may still have it.
                self.router.forget(replica, ex.adapter)
                retry = self.router.pick(candidates, [*tried, replica]) is not None
            else:
                retry = resp.status in RETRY_STATUSES
            if retry and attempt < self.config.retries:
                self.metrics.upstream_errors.labels(replica.url, f"http_{resp.status}").inc()
                last_error = f"HTTP {resp.status}"
                _discard(ex, replica, resp)
                tried.append(replica)
                continue
            return replica, resp
        if not tried:
            # A replica comes back on its next good health poll, not before.
            raise E.overloaded(f"No healthy replica serves `{ex.model}` right now; retry shortly.",
                               self.config.health_check_interval_s)
        raise E.overloaded(f"Every replica tried for `{ex.model}` failed before answering ({last_error[:200]}); "
                           f"retry shortly.", self.config.health_check_interval_s)

    async def _relay_upstream_error(self, send, ex: Exchange, resp: Response, path: str) -> None:
        """The upstream refused (e.g. vLLM's 400 for a prompt longer than the context): pass it on as OpenAI's error."""
        data = await self._read_all(resp)
        ex.upstream_s += time.perf_counter()
        ex.status = resp.status
        err = E.from_upstream(resp.status, data, ex.model, path)
        if resp.status >= 500:
            self.metrics.upstream_errors.labels(ex.replica, f"http_{resp.status}").inc()
        ex.completion_tokens = 0
        await self._audit(ex, error=err.openai_code or err.type)
        await _respond(send, resp.status, err.body(), JSON_HEADERS + ex.rate_headers, ex.rid)

    async def _read_all(self, resp: Response) -> bytes:
        try:
            if resp.complete:  # the body came with the headers (the usual JSON answer): nothing to wait for or bound
                return await resp.read()
            async with asyncio.timeout(self._stall):
                return await resp.read()
        except TimeoutError:
            self.metrics.upstream_errors.labels(resp.conn.pool.url, "stall_timeout").inc()
            raise E.upstream_timeout(f"The model stopped sending for {self._stall:g} s.") from None
        except UpstreamError as exc:
            self.metrics.upstream_errors.labels(resp.conn.pool.url, "broken_response").inc()
            raise E.upstream_error(f"The model server broke off its answer: {exc}") from None

    async def _relay_json(self, send, ex: Exchange, resp: Response) -> None:
        data = await self._read_all(resp)
        now = time.perf_counter()
        ex.upstream_s += now
        ex.ttft = now - ex.t0
        ex.status = 200
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise E.upstream_error("The model server sent a response that is not JSON.") from None
        if ex.kind == "responses" and isinstance(obj, dict):
            if (counts := responses_api.usage(obj)) is not None:
                ex.prompt_tokens, ex.completion_tokens = counts
            if ex.completion_parts is not None:
                ex.completion_parts.extend(responses_api.output_texts(obj))
                ex.reasoning().extend(responses_api.reasoning_texts(obj))
            await self._audit(ex, error="response_failed" if obj.get("status") == "failed" else None)
            await _respond(send, 200, data, JSON_HEADERS + ex.rate_headers, ex.rid)
            return
        usage = obj.get("usage") if isinstance(obj, dict) else None
        if isinstance(usage, dict):
            ex.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            ex.completion_tokens = int(usage.get("completion_tokens") or 0)
        if ex.completion_parts is not None and isinstance(obj, dict):
            choices_texts(obj, ex, "message")
        await self._audit(ex)
        await _respond(send, 200, data, JSON_HEADERS + ex.rate_headers, ex.rid)

    async def _relay_stream(self, receive, send, ex: Exchange, resp: Response, events: Any) -> None:
        """Forward the upstream's events as they come (`events.take` decides which, and what they say for the
        audit and quotas); the last ones wait until the audit record is durable."""
        gone = asyncio.Event()
        watcher: asyncio.Future | None = None  # started at the first wait: a stream that is all there needs none

        def client_gone(fut: asyncio.Future) -> None:
            if fut.cancelled():  # the stream ended first
                return
            gone.set()
            # Wakes a read still waiting for the model (queued, prefilling): the replica's slot is freed now, not at
            # the TTFT limit, and vLLM aborts the request when its connection closes.
            resp._error(UpstreamBrokenError("the client went away"))

        await send({"type": "http.response.start", "status": 200,
                    "headers": SSE_HEADERS + ex.rate_headers + [(b"x-request-id", ex.rid.encode())]})
        if not resp.ready():  # the head waits for a body part (one write); none is here yet, so it goes out alone
            await send({"type": "http.response.body", "body": b"", "more_body": True})
        ex.status = 200
        buf = b""
        held: list[bytes] = []
        failure: E.GatewayError | None = None
        take = events.take
        try:
            while True:
                try:
                    if resp.ready():  # already buffered: a timer per read costs more than the read
                        data = await resp.readany()
                    else:
                        if watcher is None:
                            watcher = asyncio.ensure_future(receive())
                            watcher.add_done_callback(client_gone)
                        async with (asyncio.timeout(self._stall) if ex.ttft is not None
                                    else asyncio.timeout_at(ex.first_byte_by)):
                            data = await resp.readany()
                except TimeoutError:
                    what = "stall" if ex.ttft is not None else "ttft"
                    self.metrics.upstream_errors.labels(ex.replica, f"{what}_timeout").inc()
                    failure = E.upstream_timeout(
                        f"The model stopped sending for {self._stall:g} s." if what == "stall"
                        else f"The model did not start answering within {self._ttft:g} s.")
                    failure.openai_code = f"upstream_{what}_timeout"
                    break
                except UpstreamError as exc:
                    if gone.is_set():
                        ex.status = 499
                        break
                    self.metrics.upstream_errors.labels(ex.replica, "broken_stream").inc()
                    failure = E.upstream_error(f"The model server broke off the stream: {type(exc).__name__}.")
                    break
                if not data:
                    break
                if ex.ttft is None:
                    ex.ttft = time.perf_counter() - ex.t0
                elif time.perf_counter() - ex.t0 > self._total:
                    failure = E.upstream_timeout(f"The answer took longer than the gateway's total limit of "
                                                 f"{self._total:g} s.")
                    break
                buf = buf + data if buf else data
                out = []
                start = 0
                while (cut := buf.find(b"\n\n", start)) >= 0:  # by index: no copy of the rest per event
                    event, start = buf[start:cut + 2], cut + 2
                    if take(event):
                        out.append(event)
                if start:
                    buf = buf[start:]
                if out:
                    if events.done:  # the end came with them: they go out with it once audited, in one write
                        held += out
                    else:
                        await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
                if gone.is_set():
                    ex.status = 499
                    break
        finally:
            ex.upstream_s += time.perf_counter()
            if watcher is not None and not watcher.done():
                watcher.cancel()
            events.flush()
        if not events.done and failure is None and ex.status != 499:
            failure = E.upstream_error("The model server ended the stream without finishing it.")
            self.metrics.upstream_errors.labels(ex.replica, "truncated_stream").inc()
        if ex.status == 499 or failure is not None:
            resp.close()  # stops generation upstream
            if not ex.completion_tokens:
                # one token per chunk is how vLLM streams; bill what was generated
                ex.completion_tokens = events.chunks
        if failure is not None:
            ex.status = failure.status
            try:
                await self._audit(ex, error=failure.openai_code)
            except E.GatewayError as exc:  # the stream has started: the audit's failure is the last event instead
                failure = exc
            await send({"type": "http.response.body", "body": b"".join(held) + events.error(failure),
                        "more_body": False})
            return
        try:
            await self._audit(ex, error="response_failed" if events.failed else None)
        except E.GatewayError as exc:
            await send({"type": "http.response.body", "body": b"".join(held) + events.error(exc), "more_body": False})
            return
        await send({"type": "http.response.body", "body": b"".join(held) + events.end(), "more_body": False})

    async def _client_left(self, ex: Exchange) -> None:
        """The client hung up before its whole answer was ready: the replica was hung up on (it stops generating);
        the attempt is audited. Nothing is billed, as for a stream abandoned before its first token: how far the
        model got is unknown."""
        ex.status = 499
        ex.completion_tokens = 0
        try:
            await self._audit(ex, error="client_disconnected")
        except E.GatewayError:
            pass  # logged by _audit; there is nobody to tell

    # bookkeeping -----------------------------------------------------------------------------------------------
    async def _audit(self, ex: Exchange, error: str | None = None) -> None:
        """Append the audit record; returns once durable. A failing audit log fails the request (fail closed)."""
        if self.audit is None or ex.entry is None:
            return
        entry = ex.entry
        mode = entry.team.audit_content
        completion = None
        if ex.completion_parts is not None:
            # each choice whole and apart, in order, streamed (interleaved) or not; its reasoning first, marked
            texts, thoughts = {0: ex.completion_parts, **(ex.other_choices or {})}, ex.reasoning_parts or {}
            completion = "\n\n".join(_choice_text(texts.get(i, ()), thoughts.get(i))
                                      for i in sorted(texts.keys() | thoughts.keys()))
        policy = dict(ex.decisions)
        policy["team_policy"] = entry.team.summary()
        if error:
            policy["error"] = error
        record = AuditRecord(ts=time.time(), request_id=ex.rid, key_id=entry.id, team=entry.team.name,
                             model=ex.base or ex.model, adapter=ex.adapter, status=ex.status,
                             prompt_tokens=ex.prompt_tokens if ex.ttft is not None else 0,
                             completion_tokens=ex.completion_tokens,
                             latency_ms=round((time.perf_counter() - ex.t0) * 1000, 3),
                             ttft_ms=round(ex.ttft * 1000, 3) if ex.ttft is not None else None, policy=policy,
                             prompt=_keep(mode, ex.prompt_text), completion=_keep(mode, completion))
        t = time.perf_counter()
        try:
            await self.audit.append(record, alone=self.inflight <= 1)
        except Exception as exc:
            log.error("audit append failed", extra={"request_id": ex.rid, "error": repr(exc)})
            raise E.GatewayError(503, "The audit trail could not be written, so the answer is withheld; retry "
                                      "shortly.", type="server_error", code="audit_unavailable") from None
        finally:
            ex.audit_s = time.perf_counter() - t
            self.metrics.audit_write.observe(ex.audit_s)

    def _count_policy(self, team: str, decisions: dict[str, Any]) -> None:
        if not decisions:
            return
        if "pii" in decisions:
            self.metrics.policy_events.labels(team, f"pii_{decisions['pii']['action']}").inc()
        if "injection" in decisions:
            self.metrics.policy_events.labels(team, f"injection_{decisions['injection']['action']}").inc()
        if "max_tokens_capped" in decisions:
            self.metrics.policy_events.labels(team, "max_tokens_capped").inc()
        if "network" in decisions:
            self.metrics.policy_events.labels(team, "network_refused").inc()

    def _observe(self, ex: Exchange) -> None:
        elapsed = time.perf_counter() - ex.t0
        m = self.metrics
        team = ex.entry.team.name if ex.entry is not None else ""
        model = ex.model if ex.status not in (400, 404, 401) else ""  # unknown names must not explode the series
        child = m.child
        child(m.requests, team, model, str(ex.status)).inc()
        if ex.kind == "models" or ex.entry is None:
            return
        child(m.latency, model, "true" if ex.stream else "false").observe(elapsed)
        if ex.ttft is not None:
            child(m.ttft, model).observe(ex.ttft)
        if ex.prompt_tokens and ex.ttft is not None:
            child(m.tokens, team, model, "prompt").inc(ex.prompt_tokens)
        if ex.completion_tokens:
            child(m.tokens, team, model, "completion").inc(ex.completion_tokens)
        upstream = ex.upstream_s if ex.upstream_s > 0 else 0.0
        m.overhead.observe(max(0.0, elapsed - upstream - ex.audit_s))
        if self.config.access_log:
            log.info("request", extra={"request_id": ex.rid, "key_id": ex.entry.id, "team": team, "model": ex.model,
                                       "status": ex.status, "stream": ex.stream, "ms": round(elapsed * 1000, 2),
                                       "prompt_tokens": ex.prompt_tokens, "completion_tokens": ex.completion_tokens,
                                       "policy": ex.decisions or None})

    async def _send_error(self, send, exc: E.GatewayError, ex: Exchange) -> None:
        headers = JSON_HEADERS + [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
        await _respond(send, exc.status, exc.body(), headers, ex.rid)


def _choice_text(parts: Any, thought: list[str] | None) -> str:
    if not thought:
        return "".join(parts)
    return f"[reasoning] {''.join(thought)}\n[answer] {''.join(parts)}"


def _keep(mode: str, text: str | None) -> str | None:
    """What the audit keeps of a text: nothing, its SHA-256, or its PII-redacted form."""
    if text is None or mode == "none":
        return None
    if mode == "hash":
        return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
    from sovereign import pii

    try:
        return pii.redact(text)[0]
    except pii.PiiRuleTimeout as exc:  # never the text unredacted; the record says why it is missing
        log.error("PII rule ran past its time budget on an audit text", extra={"error": str(exc)})
        return f"[not kept: the PII rule {exc.kind!r} ran past its time budget on this text]"


async def _respond(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]], rid: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(b"content-length", str(len(body)).encode()), (b"x-request-id", rid.encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
