"""Two real `sovereign gateway` processes sharing PostgreSQL (keys, audit) and Redis (quotas)."""

from __future__ import annotations

import time
import uuid

import openai
import pytest

from gateway.audit_read import verify
from tests.conftest import run_sovereign
from tests.gateway.conftest import start_gateway_process, write_gateway_config
from tests.gateway.gw_stores import REDIS_URL, pg_url  # noqa: F401  (fixture)

USER = [{"role": "user", "content": "hello"}]


@pytest.fixture()
def two_gateways(tmp_path, upstream, pg_url):  # noqa: F811
    config = write_gateway_config(tmp_path / "gateway.yaml", models={"fake-model": [upstream.url]},
                                  database_url=pg_url, redis_url=REDIS_URL, directory_refresh_s=0.5,
                                  health_check_interval_s=1)
    boot = run_sovereign(tmp_path, "keys", "generate").stdout.strip()
    gateways = []
    try:
        for i in range(2):
            gateways.append(start_gateway_process(config, tmp_path, bootstrap_key=boot, name=f"gw{i}"))
        yield gateways, pg_url
    finally:
        for g in gateways:
            g.stop()


def test_revocation_reaches_every_gateway_within_two_seconds(two_gateways, tmp_path):
    (a, b), db = two_gateways
    run_sovereign(tmp_path, "teams", "create", "ops", "--database-url", db)
    secret = run_sovereign(tmp_path, "keys", "create", "--team", "ops", "--database-url", db).stdout.strip()
    clients = [a.client(secret, timeout=10), b.client(secret, timeout=10)]
    deadline = time.monotonic() + 5
    while True:  # a new key also appears everywhere
        try:
            for c in clients:
                c.chat.completions.create(model="fake-model", messages=USER)
            break
        except openai.AuthenticationError:
            assert time.monotonic() < deadline, "new key not accepted by both gateways"
            time.sleep(0.1)
    key_id = next(k["id"] for k in __import__("json").loads(
        run_sovereign(tmp_path, "keys", "list", "--team", "ops", "--json", "--database-url", db).stdout))
    run_sovereign(tmp_path, "keys", "revoke", key_id, "--database-url", db)
    revoked_at = time.monotonic()
    pending = set(range(2))
    while pending:
        for i in list(pending):
            try:
                clients[i].models.list()
            except openai.AuthenticationError:
                pending.discard(i)
        assert time.monotonic() - revoked_at <= 2.0, f"gateway(s) {pending} still accept a revoked key"
        time.sleep(0.05)


def test_requests_per_minute_holds_across_gateways_and_audit_chain_is_shared(two_gateways):
    (a, b), db = two_gateways
    # The team's counters live in the shared Redis for a minute, keyed by team name: a name of this run's own
    secret = a.make_key(f"limited-{uuid.uuid4().hex[:8]}", requests_per_minute=4)
    time.sleep(1.2)  # let gateway b's directory pick the key up
    ok = limited = 0
    for i in range(8):
        c = (a if i % 2 == 0 else b).client(secret, timeout=10)
        try:
            c.chat.completions.create(model="fake-model", messages=USER)
            ok += 1
        except openai.RateLimitError:
            limited += 1
    assert ok == 4 and limited == 4
    result = verify(db)
    assert result.ok and result.count >= 8
