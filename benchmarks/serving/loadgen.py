"""Closed-loop load generator: `concurrency` streaming chat requests in flight, measured from one client process.

Output tokens are counted with the model's own tokenizer on the streamed text, the same way for every server, so
the figures do not depend on how a server reports usage.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import httpx

from benchmarks.serving.prompts import messages


@dataclass
class RequestResult:
    ttft_s: float | None
    latency_s: float
    output_tokens: int
    finish_reason: str | None
    error: str | None = None


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    wall_s: float
    output_tokens: int
    errors: int
    tokens_per_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    per_request: list[RequestResult] = field(default_factory=list)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("per_request")
        return d


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100), as numpy's default."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, url: str, model: str, i: int, max_tokens: int,
                      count_tokens: Callable[[str], int]) -> RequestResult:
    body = {"model": model, "messages": messages(i), "max_tokens": max_tokens, "temperature": 0.0, "seed": 0,
            "stream": True}
    t0 = time.perf_counter()
    ttft: float | None = None
    parts: list[str] = []
    finish: str | None = None
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return RequestResult(None, time.perf_counter() - t0, 0, None, f"HTTP {resp.status_code}: "
                                     f"{resp.text[:200]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or ""
                    if text:
                        if ttft is None:
                            ttft = time.perf_counter() - t0
                        parts.append(text)
                    finish = choice.get("finish_reason") or finish
    except httpx.HTTPError as exc:
        return RequestResult(ttft, time.perf_counter() - t0, 0, None, f"{type(exc).__name__}: {exc}")
    return RequestResult(ttft, time.perf_counter() - t0, count_tokens("".join(parts)), finish)


async def run_level(url: str, model: str, concurrency: int, requests: int, max_tokens: int,
                    count_tokens: Callable[[str], int], offset: int = 0,
                    transport: httpx.AsyncBaseTransport | None = None) -> LevelResult:
    """`requests` requests, at most `concurrency` in flight; request k uses prompt offset+k."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for k in range(requests):
        queue.put_nowait(offset + k)
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10), limits=limits, trust_env=False,
                                 transport=transport) as client:
        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await one_request(client, url, model, i, max_tokens, count_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r.error is None]
    tokens = sum(r.output_tokens for r in ok)
    ttfts = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    return LevelResult(concurrency, requests, wall, tokens, len(results) - len(ok), tokens / wall if wall else 0.0,
                       percentile(ttfts, 50), percentile(ttfts, 99), results)


async def warm_up(url: str, model: str, count_tokens: Callable[[str], int], max_tokens: int) -> None:
    """A few requests whose figures are thrown away (first-call allocations, caches, thread pools)."""
    await run_level(url, model, 2, 4, max_tokens, count_tokens, offset=0)
