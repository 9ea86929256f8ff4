"""Quota semantics, the same suite on the in-process store and on the real Redis store."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import datetime, timezone

import pytest
from gw_stores import REDIS_URL, redis_prefix  # noqa: F401  (fixture)

from gateway.quotas import (InProcessQuotaStore, QuotaExceeded, QuotaLimits, RedisQuotaStore, format_duration,
                            make_quota_store)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class Harness:
    """A store plus a way to let time pass: a fake clock in process, real time on Redis (whose clock decides)."""

    def __init__(self, kind: str, prefix: str) -> None:
        self.kind = kind
        self.loop = asyncio.new_event_loop()  # one loop per test: the Redis client belongs to the loop it ran on
        if kind == "memory":
            self.clock = Clock()
            self.store = InProcessQuotaStore(clock=self.clock)
        else:
            self.store = RedisQuotaStore(REDIS_URL, prefix=prefix)

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    async def advance(self, seconds: float) -> None:
        if self.kind == "memory":
            self.clock.now += seconds
        else:
            await asyncio.sleep(seconds)


@pytest.fixture(params=["memory", "redis"])
def h(request, redis_prefix):  # noqa: F811
    harness = Harness(request.param, redis_prefix)
    yield harness
    harness.run(harness.store.close())
    harness.loop.close()


def test_requests_per_minute_admits_the_limit_then_429_with_retry_after(h):
    lim = QuotaLimits(requests_per_minute=3)

    async def go():
        for _ in range(3):
            await h.store.reserve([("key:a", lim)], 10)
        with pytest.raises(QuotaExceeded) as ei:
            await h.store.reserve([("key:a", lim)], 10)
        return ei.value

    exc = h.run(go())
    assert exc.code == "rate_limit_exceeded" and not exc.insufficient_quota
    assert exc.kind == "requests_per_minute" and exc.subject == "key:a"
    assert 15 < exc.retry_after <= 20.01  # one request refills in 60/3 s (less whatever refilled meanwhile)
    assert exc.headers["retry-after"] == str(math.ceil(exc.retry_after))
    assert exc.headers["x-ratelimit-limit-requests"] == "3"
    assert exc.headers["x-ratelimit-remaining-requests"] == "0"
    assert "Please try again in" in str(exc)


def test_bucket_refills_continuously(h):
    lim = QuotaLimits(tokens_per_minute=60)  # 1 token per second; margins of seconds keep a busy machine honest

    async def go():
        await h.store.reserve([("key:a", lim)], 60)
        with pytest.raises(QuotaExceeded) as ei:
            await h.store.reserve([("key:a", lim)], 5)
        assert 4 < ei.value.retry_after <= 5.01
        await h.advance(1.2)
        await h.store.reserve([("key:a", lim)], 1)  # 1.2 tokens refilled
        with pytest.raises(QuotaExceeded):
            await h.store.reserve([("key:a", lim)], 5)

    h.run(go())


def test_tokens_per_minute_settle_gives_back_unused_tokens(h):
    lim = QuotaLimits(tokens_per_minute=100)

    async def go():
        r = await h.store.reserve([("key:a", lim)], 80)
        assert r.headers()["x-ratelimit-remaining-tokens"] == "20"
        with pytest.raises(QuotaExceeded) as ei:
            await h.store.reserve([("key:a", lim)], 80)
        assert ei.value.kind == "tokens_per_minute"
        await h.store.settle(r, 10)  # only 10 were used: 70 come back
        r2 = await h.store.reserve([("key:a", lim)], 80)
        assert 10 <= int(r2.headers()["x-ratelimit-remaining-tokens"]) <= 15  # plus what refilled meanwhile

    h.run(go())


def test_request_larger_than_tokens_per_minute_is_admitted_on_a_full_bucket_then_waits(h):
    lim = QuotaLimits(tokens_per_minute=100)

    async def go():
        await h.store.reserve([("key:a", lim)], 250)  # would never fit; admitted once the bucket is full
        with pytest.raises(QuotaExceeded) as ei:
            await h.store.reserve([("key:a", lim)], 1)
        return ei.value

    exc = h.run(go())
    assert exc.retry_after > 85  # 150 tokens of debt + 1 at 100/min: ~90 s


def test_daily_budget_spent_is_insufficient_quota_until_midnight_utc(h):
    lim = QuotaLimits(daily_tokens=100)

    async def go():
        r = await h.store.reserve([("key:a", lim)], 60)
        await h.store.settle(r, 60)
        await h.store.reserve([("key:a", lim)], 40)
        with pytest.raises(QuotaExceeded) as ei:
            await h.store.reserve([("key:a", lim)], 1)
        return ei.value

    exc = h.run(go())
    assert exc.code == "insufficient_quota" and exc.insufficient_quota and exc.kind == "daily_tokens"
    now = datetime.now(timezone.utc)
    to_midnight = 86400 - (now.hour * 3600 + now.minute * 60 + now.second)
    assert abs(exc.retry_after - to_midnight) < 5
    assert int(exc.headers["retry-after"]) == math.ceil(exc.retry_after)


def test_monthly_budget_counts_real_usage_after_settle(h):
    lim = QuotaLimits(monthly_tokens=1000)

    async def go():
        for _ in range(5):
            r = await h.store.reserve([("team:t", lim)], 500)  # reserve 500, use 100: 5 fit in 1000
            await h.store.settle(r, 100)
        with pytest.raises(QuotaExceeded) as ei:
            await h.store.reserve([("team:t", lim)], 501)
        assert ei.value.kind == "monthly_tokens" and ei.value.insufficient_quota
        await h.store.reserve([("team:t", lim)], 500)

    h.run(go())


def test_reservation_is_all_or_nothing_across_key_and_team(h):
    key = ("key:a", QuotaLimits(requests_per_minute=10, daily_tokens=1000))
    team = ("team:t", QuotaLimits(daily_tokens=50))

    async def go():
        await h.store.reserve([key, team], 50)
        with pytest.raises(QuotaExceeded) as ei:
            await h.store.reserve([key, team], 10)
        assert ei.value.subject == "team:t"
        # The refused request took nothing from the key: 9 requests and 950 tokens are left for it.
        for _ in range(9):
            await h.store.reserve([key], 100)
        with pytest.raises(QuotaExceeded) as ei:
            await h.store.reserve([key], 1)
        assert ei.value.kind == "requests_per_minute"

    h.run(go())


def test_headers_report_the_tightest_subject(h):
    key = ("key:a", QuotaLimits(requests_per_minute=100, tokens_per_minute=1000))
    team = ("team:t", QuotaLimits(requests_per_minute=5, tokens_per_minute=50_000))

    async def go():
        return (await h.store.reserve([key, team], 200)).headers()

    hdr = h.run(go())
    assert hdr["x-ratelimit-limit-requests"] == "5" and hdr["x-ratelimit-remaining-requests"] == "4"
    assert hdr["x-ratelimit-limit-tokens"] == "1000" and hdr["x-ratelimit-remaining-tokens"] == "800"
    assert hdr["x-ratelimit-reset-requests"] == "12s" and hdr["x-ratelimit-reset-tokens"] == "12s"


def test_usage_beyond_the_reservation_is_billed_and_settle_is_idempotent(h):
    lim = QuotaLimits(daily_tokens=100)

    async def go():
        r = await h.store.reserve([("key:a", lim)], 30)
        await h.store.settle(r, 90)  # the prompt was longer than estimated: bill what was used
        await h.store.settle(r, 90)  # a second settle changes nothing
        await h.store.reserve([("key:a", lim)], 10)
        with pytest.raises(QuotaExceeded):
            await h.store.reserve([("key:a", lim)], 1)

    h.run(go())


def test_unlimited_subjects_are_always_admitted_without_headers(h):
    async def go():
        rs = [await h.store.reserve([("key:a", QuotaLimits()), ("team:t", QuotaLimits())], 10**6) for _ in range(50)]
        return rs[-1].headers()

    assert h.run(go()) == {}


def test_lowering_a_limit_takes_effect_on_the_next_request(h):
    async def go():
        for _ in range(5):
            await h.store.reserve([("key:a", QuotaLimits(requests_per_minute=10))], 1)
        # An admin lowers the limit to 6: 5 are used, so one more fits, not six.
        await h.store.reserve([("key:a", QuotaLimits(requests_per_minute=6))], 1)
        with pytest.raises(QuotaExceeded):
            await h.store.reserve([("key:a", QuotaLimits(requests_per_minute=6))], 1)

    h.run(go())


def test_zero_limit_blocks(h):
    async def go():
        with pytest.raises(QuotaExceeded) as ei:
            await h.store.reserve([("key:a", QuotaLimits(requests_per_minute=0))], 1)
        return ei.value

    assert h.run(go()).retry_after == pytest.approx(60, abs=0.01)


def test_invalid_limits_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="tokens_per_minute"):
        QuotaLimits(tokens_per_minute=-1)
    with pytest.raises(ValueError, match="daily_tokens"):
        QuotaLimits(daily_tokens=1.5)  # type: ignore[arg-type]


def test_make_quota_store_picks_the_store():
    assert isinstance(make_quota_store(None), InProcessQuotaStore)
    store = make_quota_store(REDIS_URL)
    assert isinstance(store, RedisQuotaStore)
    asyncio.run(store.close())


def test_format_duration_matches_openai():
    assert [format_duration(s) for s in (0, 0.02, 1, 59.2, 360, 3723)] == ["0s", "20ms", "1s", "1m0s", "6m0s",
                                                                            "1h2m3s"]


def test_an_unreachable_redis_is_quota_unavailable_not_a_crash():
    from gateway.quotas import QuotaUnavailable

    from tests.conftest import free_port

    async def go():
        store = RedisQuotaStore(f"redis://127.0.0.1:{free_port()}/0")
        try:
            with pytest.raises(QuotaUnavailable) as ei:
                await store.reserve([("key:a", QuotaLimits(requests_per_minute=5))], 10)
            assert ei.value.code == "quota_unavailable" and "127.0.0.1" in str(ei.value)
            # Subjects without limits never touch Redis, so they still pass.
            await store.reserve([("key:a", QuotaLimits())], 10)
        finally:
            await store.close()

    asyncio.run(go())
