"""The real gateway process killed with SIGKILL again and again under load: every request that received a complete
response has its audit record, and the chain still verifies. On SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import yaml
from gw_stores import REPO, pg_url, sqlite_url  # noqa: F401  (fixtures)

from gateway.audit import make_engine
from gateway.audit_read import verify
from sovereign.offline import offline_env
from tests.conftest import free_port

ADMIN_KEY = "sk-crash-admin-" + "a" * 32


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request):
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


class Gateway:
    """`sovereign gateway` as its own process, restartable on the same port and database."""

    def __init__(self, tmp: Path, upstream_url: str, db_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cfg = tmp / "gateway.yaml"
        self.cfg.write_text(yaml.safe_dump({
            "host": "127.0.0.1", "port": self.port, "database_url": db_url, "models": {"fake-model": [upstream_url]},
            "directory_refresh_s": 0.2, "health_check_interval_s": 0.5, "access_log": False}), encoding="utf-8")
        self.env = offline_env(SOVEREIGN_HOME=str(tmp / "home"), SOVEREIGN_GATEWAY_BOOTSTRAP_KEY=ADMIN_KEY,
                               PYTHONPATH=str(REPO), PYTHONFAULTHANDLER="1")
        self.log = tmp / "gateway.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "sovereign.cli", "gateway", "--config", str(self.cfg),
                                          "--log-level", "warning"], env=self.env, cwd=REPO, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        last = ""
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=2)
                if r.status_code == 200:
                    return
                last = f"{r.status_code} {r.text[:500]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.2)
        self.proc.send_signal(signal.SIGABRT)  # faulthandler prints where it is stuck
        self.proc.wait(10)
        raise AssertionError(f"gateway not ready ({last}):\n{self.log.read_text()[-6000:]}")

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


class Load:
    """Client threads sending chat requests, streaming and not; remembers the request ids of complete answers."""

    def __init__(self, url: str, key: str, threads: int = 8) -> None:
        self.url, self.key = url, key
        self.complete: set[str] = set()
        self.failed = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _one(self, client: httpx.Client, stream: bool) -> str | None:
        body = {"model": "fake-model", "max_tokens": 16, "stream": stream,
                "messages": [{"role": "user", "content": "call me on 13812345678"}]}
        if not stream:
            r = client.post("/v1/chat/completions", json=body)
            if r.status_code == 200 and r.json()["choices"][0]["message"]["content"]:
                return r.headers["x-request-id"]
            return None
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return None
            done = False
            for line in r.iter_lines():
                if line.startswith("data:") and '"error"' in line:
                    return None  # an in-band error is not a complete answer
                if line.strip() == "data: [DONE]":
                    done = True
            return r.headers["x-request-id"] if done else None

    def _run(self, i: int) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        n = i
        with httpx.Client(base_url=self.url, headers=headers, timeout=10) as client:  # one client: cheap retries
            while not self.stop.is_set():
                n += 1
                try:
                    rid = self._one(client, stream=n % 2 == 0)
                except (httpx.HTTPError, KeyError, ValueError):
                    rid = None
                    time.sleep(0.2)  # the gateway is down: leave the CPU to its restart
                with self.lock:
                    if rid:
                        self.complete.add(rid)
                    else:
                        self.failed += 1

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


@pytest.mark.slow
def test_gateway_sigkilled_under_load_keeps_every_answered_request_audited(tmp_path, upstream, db_url):
    gw = Gateway(tmp_path, upstream.url, db_url)
    try:
        gw.start()
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        r = httpx.post(f"{gw.url}/admin/teams", headers=admin, json={
            "name": "crash", "pii": "redact", "audit_content": "redacted", "requests_per_minute": 1_000_000,
            "tokens_per_minute": 10**9, "daily_tokens": 2 * 10**9})
        assert r.status_code == 201, r.text + gw.log.read_text()[-3000:]
        r = httpx.post(f"{gw.url}/admin/keys", headers=admin, json={"team": "crash", "name": "load"})
        assert r.status_code == 201, r.text + gw.log.read_text()[-3000:]
        key = r.json()["secret"]
        time.sleep(0.5)  # the directory refresher picks the key up
        with Load(gw.url, key) as load:
            for round_ in range(4):
                before = len(load.complete)
                deadline = time.monotonic() + 30
                while len(load.complete) < before + 40 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert len(load.complete) >= before + 40, f"round {round_}: no progress\n{gw.log.read_text()[-3000:]}"
                gw.kill()  # mid-flight: requests are being proxied and audited right now
                gw.start()
        assert load.complete
        result = verify(db_url)
        assert result.ok, result
        engine = make_engine(db_url, writer=False)
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT request_id, prompt FROM audit_log")).all()
        engine.dispose()
        stored = {r[0] for r in rows}
        missing = load.complete - stored
        assert not missing, f"{len(missing)} of {len(load.complete)} answered requests have no audit record"
        assert result.count == len(rows) >= len(load.complete)
        # Policy redact: the phone number is nowhere in the audit trail.
        assert all("13812345678" not in (p or "") for _, p in rows)
        assert any("[PHONE]" in (p or "") for _, p in rows)
    finally:
        gw.stop()
