"""Quotas: requests/min, tokens/min, daily and monthly token budgets, per key and per team.

A request is admitted by `reserve(subjects, tokens)` with tokens = prompt tokens + max_tokens, all-or-nothing across
its subjects (the key and its team), and `settle(reservation, used)` replaces the reservation with the real usage when
the request ends. Per-minute limits are token buckets (capacity = the limit, refilled continuously at limit/60 per
second), so a burst cannot double a limit at a window edge; daily/monthly budgets are counters per UTC day/month.

Two stores with the same semantics: `InProcessQuotaStore` for one gateway process, `RedisQuotaStore` when several
replicas share Redis. There each reserve/settle is one Lua script (atomic in Redis, using Redis's clock), so limits hold
across replicas instead of multiplying by them. A budget can overshoot only where real usage exceeds what was reserved
(for example a prompt longer than its estimate), at most one request's difference per replica in flight.

A reservation whose gateway dies before settling stays charged against the day/month budget (the conservative side);
per-minute buckets refill on their own.
"""

from __future__ import annotations

import asyncio
import calendar
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sovereign.errors import SovereignError

# The four dimensions, in the order the Lua script and the in-process store return them.
RPM, TPM, DAILY, MONTHLY = "requests_per_minute", "tokens_per_minute", "daily_tokens", "monthly_tokens"
_NONE = -1  # "no limit" on the wire to the Lua script


@dataclass(frozen=True, slots=True)
class QuotaLimits:
    """Limits of one subject (a key or a team); None means unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in (RPM, TPM, DAILY, MONTHLY):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"QuotaLimits.{name} must be a whole number >= 0 or None, got {v!r}")

    def is_unlimited(self) -> bool:
        return (self.requests_per_minute is None and self.tokens_per_minute is None and self.daily_tokens is None
                and self.monthly_tokens is None)


class QuotaExceeded(SovereignError):
    """A request refused by a quota: 429 with `rate_limit_exceeded` (retry later) or `insufficient_quota` (budget)."""

    def __init__(self, subject: str, kind: str, limit: int, retry_after: float, insufficient_quota: bool,
                 headers: dict[str, str] | None = None, message: str | None = None) -> None:
        self.subject = subject
        self.kind = kind
        self.limit = limit
        self.retry_after = retry_after
        self.insufficient_quota = insufficient_quota
        self.headers = dict(headers or {})
        self.headers["retry-after"] = str(max(1, math.ceil(retry_after)))
        self.headers["retry-after-ms"] = str(max(1, math.ceil(retry_after * 1000)))
        what = kind.replace("_", " ")
        if message is None:
            if insufficient_quota:
                message = (f"You exceeded your {what} budget ({limit} tokens) for {subject}; it resets in "
                           f"{format_duration(retry_after)}. Ask an administrator to raise it, or lower max_tokens.")
            else:
                message = (f"Rate limit reached for {subject} on {what}: limit {limit}. "
                           f"Please try again in {format_duration(retry_after)}.")
        super().__init__(message, code="insufficient_quota" if insufficient_quota else "rate_limit_exceeded")


class QuotaUnavailable(SovereignError):
    """The shared quota store (Redis) could not be reached; the gateway answers 503 rather than guess."""

    code = "quota_unavailable"


@dataclass(slots=True)
class _LimitState:
    """What one dimension of the most restrictive subject looks like after a decision (for the headers)."""

    limit: int
    remaining: float
    reset_s: float


@dataclass(slots=True)
class Reservation:
    """What `reserve` took; hand it back to `settle` exactly once (later calls are no-ops)."""

    subjects: list[tuple[str, QuotaLimits]]
    tokens: int
    day: str
    month: str
    rate: dict[str, _LimitState] = field(default_factory=dict)
    settled: bool = False

    def headers(self) -> dict[str, str]:
        """x-ratelimit-* headers as OpenAI names them, for the tightest subject of each dimension."""
        return _rate_headers(self.rate)


def _rate_headers(rate: dict[str, _LimitState]) -> dict[str, str]:
    out: dict[str, str] = {}
    for dim, suffix in ((RPM, "requests"), (TPM, "tokens")):
        st = rate.get(dim)
        if st is None:
            continue
        out[f"x-ratelimit-limit-{suffix}"] = str(st.limit)
        out[f"x-ratelimit-remaining-{suffix}"] = str(max(0, math.floor(st.remaining)))
        out[f"x-ratelimit-reset-{suffix}"] = format_duration(st.reset_s)
    return out


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: '20ms', '1s', '6m0s', '1h2m3s'."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    total = math.ceil(seconds)
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


_period_cache: tuple[float, float, str, str, float, float] = (0.0, -1.0, "", "", 0.0, 0.0)


def _periods(now: float) -> tuple[str, str, float, float]:
    """(day key, month key, seconds to the next UTC day, seconds to the next UTC month); cached for the day."""
    global _period_cache
    start, end, day, month, day_end, month_end = _period_cache
    if not start <= now < end:
        dt = datetime.fromtimestamp(now, tz=timezone.utc)
        start = datetime(dt.year, dt.month, dt.day, tzinfo=timezone.utc).timestamp()
        ndays = calendar.monthrange(dt.year, dt.month)[1]
        month_start = datetime(dt.year, dt.month, 1, tzinfo=timezone.utc).timestamp()
        end = day_end = start + 86400
        month_end = month_start + ndays * 86400
        day, month = dt.strftime("%Y%m%d"), dt.strftime("%Y%m")
        _period_cache = (start, end, day, month, day_end, month_end)
    return day, month, day_end - now, month_end - now


def _active(subjects: Sequence[tuple[str, QuotaLimits]]) -> list[tuple[str, QuotaLimits]]:
    return [(s, lim) for s, lim in subjects if not lim.is_unlimited()]


class QuotaStore:
    """Interface of both stores."""

    async def reserve(self, subjects: list[tuple[str, QuotaLimits]], tokens: int) -> Reservation:
        raise NotImplementedError

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------------- in-process


class _Bucket:
    """A token bucket of `capacity`, refilled at capacity/60 per second; level may go negative (debt)."""

    __slots__ = ("capacity", "level", "ts")

    def __init__(self, capacity: int, now: float) -> None:
        self.capacity, self.level, self.ts = capacity, float(capacity), now

    def refill(self, capacity: int, now: float) -> None:
        if capacity != self.capacity:  # limit changed by an admin: keep what was used, not what was left
            self.level += capacity - self.capacity
            self.capacity = capacity
        self.level = min(float(capacity), self.level + max(0.0, now - self.ts) * capacity / 60.0)
        self.ts = now

    def wait_for(self, need: float) -> float:
        """Seconds until `need` is available (need is capped at capacity, so a big request is admitted when full)."""
        if self.capacity == 0:  # a limit of 0 blocks the dimension; say "a minute" rather than "never"
            return 60.0
        need = min(need, float(self.capacity))
        return 0.0 if self.level >= need else (need - self.level) * 60.0 / self.capacity

    def reset_s(self) -> float:
        return _reset_s(self.capacity, self.level)


class InProcessQuotaStore(QuotaStore):
    """Quotas for one gateway process; atomic because reserve/settle never await while deciding."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._counters: dict[tuple[str, str], int] = {}  # (subject, "d:YYYYMMDD" | "m:YYYYMM") -> tokens

    def _bucket(self, subject: str, dim: str, capacity: int, now: float) -> _Bucket:
        b = self._buckets.get((subject, dim))
        if b is None:
            b = self._buckets[(subject, dim)] = _Bucket(capacity, now)
        else:
            b.refill(capacity, now)
        return b

    async def reserve(self, subjects: list[tuple[str, QuotaLimits]], tokens: int) -> Reservation:
        now = self._clock()
        day, month, day_left, month_left = _periods(now)
        active = _active(subjects)
        rate: dict[str, _LimitState] = {}
        failure: QuotaExceeded | None = None
        worst_wait = -1.0
        budget_failure: QuotaExceeded | None = None
        for subject, lim in active:
            for dim, cap, need in ((RPM, lim.requests_per_minute, 1), (TPM, lim.tokens_per_minute, tokens)):
                if cap is None:
                    continue
                b = self._bucket(subject, dim, cap, now)
                wait = b.wait_for(need)
                if wait > worst_wait and wait > 0:
                    worst_wait = wait
                    failure = QuotaExceeded(subject, dim, cap, wait, False)
            for dim, cap, key, left in ((DAILY, lim.daily_tokens, "d:" + day, day_left),
                                        (MONTHLY, lim.monthly_tokens, "m:" + month, month_left)):
                if cap is None or budget_failure is not None:
                    continue
                if self._counters.get((subject, key), 0) + tokens > cap:
                    budget_failure = QuotaExceeded(subject, dim, cap, left, True)
        fail = budget_failure or failure
        for subject, lim in active:
            for dim, cap, need in ((RPM, lim.requests_per_minute, 1), (TPM, lim.tokens_per_minute, tokens)):
                if cap is None:
                    continue
                b = self._buckets[(subject, dim)]
                if fail is None:
                    b.level -= need
                _tighter(rate, dim, _LimitState(cap, b.level, b.reset_s()))
            if fail is None:
                for cap, key in ((lim.daily_tokens, "d:" + day), (lim.monthly_tokens, "m:" + month)):
                    if cap is not None:
                        self._counters[(subject, key)] = self._counters.get((subject, key), 0) + tokens
        if fail is not None:
            fail.headers.update(_rate_headers(rate))
            raise fail
        return Reservation(subjects=active, tokens=tokens, day=day, month=month, rate=rate)

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        delta = used_tokens - reservation.tokens  # negative: give back what was reserved but not used
        if delta == 0:
            return
        now = self._clock()
        for subject, lim in reservation.subjects:
            if lim.tokens_per_minute is not None:
                b = self._bucket(subject, TPM, lim.tokens_per_minute, now)
                b.level = min(float(b.capacity), b.level - delta)
            for cap, key in ((lim.daily_tokens, "d:" + reservation.day), (lim.monthly_tokens, "m:" + reservation.month)):
                if cap is not None:
                    self._counters[(subject, key)] = max(0, self._counters.get((subject, key), 0) + delta)


def _tighter(rate: dict[str, _LimitState], dim: str, st: _LimitState) -> None:
    cur = rate.get(dim)
    if cur is None or st.remaining < cur.remaining:
        rate[dim] = st


# ---------------------------------------------------------------------------------------------------------- Redis

# KEYS per subject: rpm bucket, tpm bucket, day counter, month counter.
# ARGV: tokens, n, then per subject: rpm, tpm, daily, monthly (-1 = none), day_ttl, month_ttl.
# Returns {ok, fail_index, fail_kind, fail_wait_or_limit, per subject: rpm_level, rpm_reset, tpm_level, tpm_reset}.
# Buckets are hashes {l = level, t = last refill (ms)}; Redis's clock keeps replicas consistent.
_BUCKET_LUA = """
local function bucket(key, cap, now)
  local v = redis.call('HMGET', key, 'l', 't')
  local level, ts = tonumber(v[1]), tonumber(v[2])
  if level == nil then return cap, now end
  local c = tonumber(redis.call('HGET', key, 'c') or cap)
  if c ~= cap then level = level + cap - c end
  level = math.min(cap, level + math.max(0, now - ts) * cap / 60000.0)
  return level, now
end
local function put(key, cap, level, now)
  redis.call('HSET', key, 'l', tostring(level), 't', now, 'c', cap)
  redis.call('PEXPIRE', key, 120000)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_RESERVE_LUA = _BUCKET_LUA + """
local tokens = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local out = {1, 0, '', '0'}
local worst = 0
local budget_fail = false
local state = {}
for i = 0, n - 1 do
  local a = 3 + i * 6
  local rpm, tpm, daily, monthly = tonumber(ARGV[a]), tonumber(ARGV[a+1]), tonumber(ARGV[a+2]), tonumber(ARGV[a+3])
  local k = i * 4
  local s = {}
  if rpm >= 0 then
    s.rl = bucket(KEYS[k+1], rpm, now)
    local need = math.min(1, rpm)
    if (rpm == 0 or s.rl < need) and not budget_fail then
      local w = 60000
      if rpm > 0 then w = (need - s.rl) * 60000.0 / rpm end
      if w > worst then worst = w; out = {0, i + 1, 'requests_per_minute', tostring(w)} end
    end
  end
  if tpm >= 0 then
    s.tl = bucket(KEYS[k+2], tpm, now)
    local need = math.min(tokens, tpm)
    if (tpm == 0 or s.tl < need) and not budget_fail then
      local w = 60000
      if tpm > 0 then w = (need - s.tl) * 60000.0 / tpm end
      if w > worst then worst = w; out = {0, i + 1, 'tokens_per_minute', tostring(w)} end
    end
  end
  if not budget_fail and daily >= 0 and tonumber(redis.call('GET', KEYS[k+3]) or '0') + tokens > daily then
    budget_fail = true; out = {0, i + 1, 'daily_tokens', '0'}
  end
  if not budget_fail and monthly >= 0 and tonumber(redis.call('GET', KEYS[k+4]) or '0') + tokens > monthly then
    budget_fail = true; out = {0, i + 1, 'monthly_tokens', '0'}
  end
  state[i] = s
end
local ok = out[1] == 1
for i = 0, n - 1 do
  local a = 3 + i * 6
  local rpm, tpm, daily, monthly = tonumber(ARGV[a]), tonumber(ARGV[a+1]), tonumber(ARGV[a+2]), tonumber(ARGV[a+3])
  local k = i * 4
  local s = state[i]
  if rpm >= 0 then
    if ok then s.rl = s.rl - 1 end
    put(KEYS[k+1], rpm, s.rl, now)
    table.insert(out, tostring(s.rl))
  else table.insert(out, '') end
  if tpm >= 0 then
    if ok then s.tl = s.tl - tokens end
    put(KEYS[k+2], tpm, s.tl, now)
    table.insert(out, tostring(s.tl))
  else table.insert(out, '') end
  if ok and daily >= 0 then
    redis.call('INCRBY', KEYS[k+3], tokens); redis.call('EXPIRE', KEYS[k+3], tonumber(ARGV[a+4]))
  end
  if ok and monthly >= 0 then
    redis.call('INCRBY', KEYS[k+4], tokens); redis.call('EXPIRE', KEYS[k+4], tonumber(ARGV[a+5]))
  end
end
return out
"""

# KEYS per subject: tpm bucket, day counter, month counter. ARGV: delta (used - reserved), n, then per subject:
# tpm, daily, monthly (-1 = none).
_SETTLE_LUA = _BUCKET_LUA + """
local delta = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
for i = 0, n - 1 do
  local a = 3 + i * 3
  local tpm, daily, monthly = tonumber(ARGV[a]), tonumber(ARGV[a+1]), tonumber(ARGV[a+2])
  local k = i * 3
  if tpm >= 0 then
    local level = bucket(KEYS[k+1], tpm, now)
    put(KEYS[k+1], tpm, math.min(tpm, level - delta), now)
  end
  for j, cap in ipairs({daily, monthly}) do
    if cap >= 0 and redis.call('EXISTS', KEYS[k+1+j]) == 1 then
      local v = redis.call('INCRBY', KEYS[k+1+j], delta)
      if v < 0 then redis.call('SET', KEYS[k+1+j], 0, 'KEEPTTL') end
    end
  end
end
return 1
"""


def _arg(v: int | None) -> int:
    return _NONE if v is None else int(v)


class RedisQuotaStore(QuotaStore):
    """Quotas shared by every gateway replica through one Redis; each decision is one atomic Lua script."""

    def __init__(self, url: str, prefix: str = "sovereign:quota") -> None:
        import redis.asyncio as aioredis  # only replicas sharing Redis pay for importing it
        from redis.exceptions import RedisError

        self._redis = aioredis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=2,
                                              socket_timeout=5)
        self._where = self._redis.get_connection_kwargs().get("host", "redis")
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError)
        self._prefix = prefix
        self._reserve = self._redis.register_script(_RESERVE_LUA)
        self._settle = self._redis.register_script(_SETTLE_LUA)

    def _key(self, subject: str, what: str) -> str:
        return f"{self._prefix}:{{{subject}}}:{what}"

    async def reserve(self, subjects: list[tuple[str, QuotaLimits]], tokens: int) -> Reservation:
        active = _active(subjects)
        day, month, day_left, month_left = _periods(time.time())
        if not active:
            return Reservation(subjects=[], tokens=tokens, day=day, month=month)
        keys: list[str] = []
        args: list[int | str] = [int(tokens), len(active)]
        for subject, lim in active:
            keys += [self._key(subject, "rpm"), self._key(subject, "tpm"), self._key(subject, "d:" + day),
                     self._key(subject, "m:" + month)]
            args += [_arg(lim.requests_per_minute), _arg(lim.tokens_per_minute), _arg(lim.daily_tokens),
                     _arg(lim.monthly_tokens), int(day_left) + 86400, int(month_left) + 86400]
        try:
            out = await self._reserve(keys=keys, args=args)
        except self._errors as exc:
            raise QuotaUnavailable(f"the quota store at {self._where} is unavailable ({type(exc).__name__}); "
                                   "requests cannot be admitted until it is back") from exc
        rate: dict[str, _LimitState] = {}
        for i, (_subject, lim) in enumerate(active):
            rl, tl = out[4 + 2 * i], out[5 + 2 * i]
            if lim.requests_per_minute is not None and rl != "":
                cap = lim.requests_per_minute
                _tighter(rate, RPM, _LimitState(cap, float(rl), _reset_s(cap, float(rl))))
            if lim.tokens_per_minute is not None and tl != "":
                cap = lim.tokens_per_minute
                _tighter(rate, TPM, _LimitState(cap, float(tl), _reset_s(cap, float(tl))))
        if int(out[0]) != 1:
            subject, lim = active[int(out[1]) - 1]
            kind = out[2]
            cap = int(getattr(lim, kind))
            if kind == DAILY:
                exc = QuotaExceeded(subject, kind, cap, day_left, True)
            elif kind == MONTHLY:
                exc = QuotaExceeded(subject, kind, cap, month_left, True)
            else:
                exc = QuotaExceeded(subject, kind, cap, float(out[3]) / 1000.0, False)
            exc.headers.update(_rate_headers(rate))
            raise exc
        return Reservation(subjects=active, tokens=tokens, day=day, month=month, rate=rate)

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        if reservation.settled:
            return
        reservation.settled = True
        delta = int(used_tokens) - reservation.tokens
        if delta == 0 or not reservation.subjects:
            return
        keys: list[str] = []
        args: list[int] = [delta, len(reservation.subjects)]
        for subject, lim in reservation.subjects:
            keys += [self._key(subject, "tpm"), self._key(subject, "d:" + reservation.day),
                     self._key(subject, "m:" + reservation.month)]
            args += [_arg(lim.tokens_per_minute), _arg(lim.daily_tokens), _arg(lim.monthly_tokens)]
        try:
            await self._settle(keys=keys, args=args)
        except self._errors as exc:
            raise QuotaUnavailable(f"the quota store at {self._where} is unavailable ({type(exc).__name__}); "
                                   f"{delta:+d} tokens were not settled") from exc

    async def usage(self, subject: str, when: float | None = None) -> tuple[int, int]:
        """Tokens charged to `subject` today and this month (UTC), reservations in flight included."""
        day, month, _, _ = _periods(time.time() if when is None else when)
        d, m = await self._redis.mget(self._key(subject, "d:" + day), self._key(subject, "m:" + month))
        return int(d or 0), int(m or 0)

    async def close(self) -> None:
        await self._redis.aclose()


def _reset_s(cap: int, level: float) -> float:
    return max(0.0, (cap - level) * 60.0 / cap) if cap > 0 else 0.0


def make_quota_store(redis_url: str | None) -> QuotaStore:
    """In-process store when `redis_url` is None (one gateway process), Redis otherwise (several replicas)."""
    if redis_url:
        return RedisQuotaStore(redis_url)
    return InProcessQuotaStore()


async def _selfcheck() -> None:  # pragma: no cover - handy from a shell: python -m gateway.quotas
    store = InProcessQuotaStore()
    r = await store.reserve([("key:demo", QuotaLimits(requests_per_minute=2, tokens_per_minute=100))], 10)
    print(r.headers())


if __name__ == "__main__":  # pragma: no cover
    asyncio.run(_selfcheck())
