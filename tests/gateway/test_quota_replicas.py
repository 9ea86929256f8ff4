"""Several gateway replicas (separate processes) sharing the real Redis: limits hold across them, not per replica."""

from __future__ import annotations

import json
import subprocess
import time

import redis
from gw_stores import REDIS_URL, REPO, redis_prefix, worker_cmd  # noqa: F401  (fixture)

from sovereign.offline import offline_env

REPLICAS = 3


def run_replicas(spec: dict) -> list[dict]:
    procs = [subprocess.Popen(worker_cmd("quota-load", json.dumps(dict(spec, seed=i))), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=offline_env(), cwd=REPO)
             for i in range(REPLICAS)]
    for p in procs:  # wait until every replica is connected, then start them together
        assert p.stdout.readline().strip() == "READY", p.stderr.read()
    for p in procs:
        p.stdin.write("GO\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_daily_budget_holds_across_replicas_under_concurrent_load(redis_prefix):  # noqa: F811
    budget = 20_000
    spec = {"redis_url": REDIS_URL, "prefix": redis_prefix, "concurrency": 8, "duration": 4.0, "tokens": 100,
            "used_min": 40, "used_max": 100, "work": 0.05,
            "subjects": [["key:k1", {"daily_tokens": budget}], ["team:sales", {"monthly_tokens": 10 * budget}]]}
    results = run_replicas(spec)
    used = sum(r["used"] for r in results)
    assert all(r["admitted"] > 0 for r in results), results  # every replica got a share
    assert sum(r["budget_refusals"] for r in results) > 0, results  # the budget was reached
    # Usage never exceeds what was reserved, so the budget holds exactly; and it was actually spent, not starved.
    assert budget - 100 * REPLICAS * spec["concurrency"] <= used <= budget, results
    # Redis's counters are exactly the sum of the settled usage of all replicas.
    r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    day = time.strftime("%Y%m%d", time.gmtime())
    month = time.strftime("%Y%m", time.gmtime())
    assert int(r.get(f"{redis_prefix}:{{key:k1}}:d:{day}")) == used
    assert int(r.get(f"{redis_prefix}:{{team:sales}}:m:{month}")) == used
    r.close()


def test_usage_beyond_reservations_overshoots_by_at_most_the_in_flight_excess(redis_prefix):  # noqa: F811
    budget = 10_000
    spec = {"redis_url": REDIS_URL, "prefix": redis_prefix, "concurrency": 1, "duration": 4.0, "tokens": 100,
            "used_min": 80, "used_max": 130, "work": 0.01, "subjects": [["key:k1", {"daily_tokens": budget}]]}
    results = run_replicas(spec)
    used = sum(r["used"] for r in results)
    max_over = max(r["max_over"] for r in results)
    assert sum(r["budget_refusals"] for r in results) > 0, results
    # One request in flight per replica: each may exceed its reservation once after the budget is reached.
    assert used <= budget + REPLICAS * max_over, results
    assert used <= budget + REPLICAS * spec["tokens"], results


def test_requests_per_minute_holds_across_replicas(redis_prefix):  # noqa: F811
    rpm = 60
    spec = {"redis_url": REDIS_URL, "prefix": redis_prefix, "concurrency": 8, "duration": 3.0, "tokens": 10,
            "used_min": 10, "used_max": 10, "work": 0.0, "backoff": 0.01,
            "subjects": [["key:k1", {"requests_per_minute": rpm}], ["team:sales", {"tokens_per_minute": 10**6}]]}
    results = run_replicas(spec)
    admitted = sum(r["admitted"] for r in results)
    assert sum(r["rate_refusals"] for r in results) > 0, results
    # The full bucket (60) plus what refills at 1/s during the ~3 s run (+1 for clock skew between replicas);
    # per-replica counters would have admitted 3 x 60.
    assert rpm <= admitted <= rpm + spec["duration"] + 2, results
