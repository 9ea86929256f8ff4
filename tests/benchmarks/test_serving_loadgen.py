"""The serving benchmark's load generator against a fake streaming upstream (a transport seam): it counts tokens
from the streamed text, measures TTFT, keeps at most `concurrency` requests in flight, and counts failures."""

import asyncio
import json

import httpx
import pytest

from benchmarks.serving.loadgen import percentile, run_level
from benchmarks.serving.prompts import QUESTIONS, messages


def _words(text: str) -> int:
    return len(text.split())


class FakeUpstream:
    """An OpenAI-style SSE stream of `words` words per request, with a role chunk first and usage-free chunks."""

    def __init__(self, words: int = 5, fail_every: int = 0) -> None:
        self.words = words
        self.fail_every = fail_every
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        if self.fail_every and len(self.bodies) % self.fail_every == 0:
            return httpx.Response(500, json={"error": {"message": "boom"}})

        async def stream():
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            yield b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
            for i in range(self.words):
                await asyncio.sleep(0.001)
                chunk = {"choices": [{"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            yield b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n'
            # The client stops reading at [DONE]: the request is over for it once that is sent.
            self.in_flight -= 1
            yield b"data: [DONE]\n\n"

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream())


def test_level_counts_streamed_tokens_and_respects_concurrency():
    up = FakeUpstream(words=7)
    res = asyncio.run(run_level("http://fake", "m", 3, 9, 32, _words, transport=httpx.MockTransport(up)))
    assert res.errors == 0 and res.requests == 9
    assert res.output_tokens == 9 * 7
    assert all(r.finish_reason == "length" and r.ttft_s is not None and r.ttft_s <= r.latency_s
               for r in res.per_request)
    assert up.max_in_flight == 3
    assert res.tokens_per_s == pytest.approx(res.output_tokens / res.wall_s)
    # Greedy, fixed max_tokens, streamed, the fixed prompts in order.
    assert {b["temperature"] for b in up.bodies} == {0.0} and {b["max_tokens"] for b in up.bodies} == {32}
    assert all(b["stream"] for b in up.bodies)
    assert sorted(b["messages"][1]["content"] for b in up.bodies) == sorted(QUESTIONS[:9])


def test_failed_requests_are_counted_not_measured():
    res = asyncio.run(run_level("http://fake", "m", 2, 6, 8, _words,
                                transport=httpx.MockTransport(FakeUpstream(words=4, fail_every=3))))
    assert res.errors == 2
    assert res.output_tokens == 4 * 4
    assert all("HTTP 500" in r.error for r in res.per_request if r.error)


def test_percentile_interpolates_like_numpy():
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)


def test_prompts_cycle_with_the_system_prompt_first():
    first, again = messages(0), messages(len(QUESTIONS))
    assert first == again and first[0]["role"] == "system" and first[1]["role"] == "user"
