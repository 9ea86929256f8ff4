"""Gateway fixtures: a fast fake upstream and the real gateway app, both over real HTTP in threads.

`live_gateway` (end to end) starts `sovereign gateway` as a subprocess in front of the real vLLM CPU server.
"""

from __future__ import annotations

import signal
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openai import OpenAI

from gateway.accounts import Accounts, KeySpec, TeamSpec, generate_secret
from gateway.app import GatewayApp
from gateway.config import GatewayConfig
from gateway.http_protocol import CoalescingHttpToolsProtocol
from sovereign.offline import offline_env
from tests.gateway.fake_upstream import FakeUpstream, ThreadServer


@dataclass
class GatewayHandle:
    url: str
    admin_key: str
    app: GatewayApp
    accounts: Accounts

    def client(self, key: str, **kw) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=kw.pop("timeout", 30), **kw)

    def key(self, team: str = "t", *, limits: dict | None = None, **policy) -> str:
        """A fresh key on a team created (or updated) with `policy`; returns the secret."""
        existing = {t.name for t in self.accounts.list_teams()}
        if team not in existing:
            self.accounts.create_team(TeamSpec(name=team, **policy))
        created = self.accounts.create_key(KeySpec(team=team, **(limits or {})))
        self.app.directory.reload_if_changed()
        return created.secret

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)


def gateway_config(tmp_path: Path, pools: dict[str, list[str]], **overrides) -> GatewayConfig:
    base = dict(database_url=f"sqlite:///{tmp_path / 'gateway.db'}", models=pools, bootstrap_key=generate_secret(),
                timeouts={"connect": 2, "ttft": 2, "stall": 1, "total": 30}, health_check_interval_s=0.5,
                directory_refresh_s=0.2, access_log=False,
                # In-process gateways leave the rules file of whoever runs the tests alone; the watch is tested on its
                # own and in gateway processes with homes of their own.
                pii_rules_refresh_s=0)
    base.update(overrides)
    return GatewayConfig.load(None, **base)


@pytest.fixture()
def upstream():
    fake = FakeUpstream(adapters=["support@1"])
    with ThreadServer(fake) as server:
        fake.url = server.url
        yield fake


@pytest.fixture()
def start_gateway(tmp_path):
    """start_gateway(pools, **config overrides) -> GatewayHandle, stopped at the end of the test."""
    servers = []

    def start(pools: dict[str, list[str]], **overrides) -> GatewayHandle:
        cfg = gateway_config(tmp_path / f"gw{len(servers)}", pools, **overrides)
        (tmp_path / f"gw{len(servers)}").mkdir(exist_ok=True)
        app = GatewayApp(cfg)
        server = ThreadServer(app, http=CoalescingHttpToolsProtocol).__enter__()  # as `sovereign gateway` serves
        servers.append(server)
        return GatewayHandle(server.url, cfg.bootstrap_key.get_secret_value(), app, app.accounts)

    yield start
    for s in servers:
        s.__exit__(None, None, None)


@pytest.fixture()
def gw(start_gateway, upstream) -> GatewayHandle:
    return start_gateway({"fake-model": [upstream.url]})


# --------------------------------------------------------------------------------------------- gateway processes
@dataclass
class GatewayProcess:
    url: str
    admin_key: str
    proc: "subprocess.Popen"
    log_path: Path
    verify: Any = True  # an SSLContext trusting the gateway's certificate when it serves HTTPS

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=30,
                            verify=self.verify)

    def make_key(self, team: str, **policy) -> str:
        """Create `team` (if new) with `policy` and a key on it through the admin API; returns the secret."""
        with self.admin() as admin:
            r = admin.post("/admin/teams", json={"name": team, **policy})
            assert r.status_code in (201, 409), r.text
            r = admin.post("/admin/keys", json={"team": team})
            assert r.status_code == 201, r.text
            return r.json()["secret"]

    def client(self, key: str, **kw) -> OpenAI:
        if self.verify is not True:
            kw.setdefault("http_client", httpx.Client(verify=self.verify))
        return OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=kw.pop("timeout", 300), **kw)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for(what, predicate, timeout: float = 30.0, interval: float = 0.1):
    """`predicate()` once it is truthy; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def write_gateway_config(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def start_gateway_process(config: Path, home: Path, *, bootstrap_key: str | None = None,
                          timeout: float = 60, name: str = "gateway", tls_ca: Path | None = None) -> GatewayProcess:
    """`sovereign gateway --config config` as a real subprocess on a free port; waits until /healthz answers (over
    HTTPS, trusting `tls_ca`, when the config serves TLS)."""
    from tests.conftest import REPO, free_port, sovereign_cmd

    port = free_port()
    key = bootstrap_key or generate_secret()
    log_path = home / f"{name}-{port}.log"
    env = offline_env(SOVEREIGN_HOME=str(home), PYTHONPATH=str(REPO), SOVEREIGN_GATEWAY_BOOTSTRAP_KEY=key)
    for var in [v for v in env if v.startswith("SOVEREIGN_GATEWAY_") and v != "SOVEREIGN_GATEWAY_BOOTSTRAP_KEY"]:
        env.pop(var)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(sovereign_cmd("gateway", "--config", str(config), "--port", str(port)), env=env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    verify = ssl.create_default_context(cafile=str(tls_ca)) if tls_ca else True
    handle = GatewayProcess(f"{'https' if tls_ca else 'http'}://127.0.0.1:{port}", key, proc, log_path, verify)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited with {proc.returncode}:\n{handle.log_tail()}")
        try:
            if httpx.get(f"{handle.url}/healthz", timeout=2, verify=verify).status_code == 200:
                return handle
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            handle.stop()
            raise AssertionError(f"gateway did not answer within {timeout}s:\n{handle.log_tail()}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def live_gateway(vllm_server, tmp_path_factory):
    """`sovereign gateway` (a subprocess, SQLite, in-process quotas) in front of the real vLLM CPU server."""
    home = tmp_path_factory.mktemp("live-gateway")
    config = write_gateway_config(home / "gateway.yaml", models={vllm_server.model: [vllm_server.base_url]},
                                  database_url=f"sqlite:///{home / 'gateway.db'}",
                                  timeouts={"connect": 5, "ttft": 300, "stall": 120, "total": 600},
                                  health_check_interval_s=2, directory_refresh_s=0.5)
    gw = start_gateway_process(config, home, name="live-gateway")
    try:
        deadline = time.monotonic() + 120
        while httpx.get(f"{gw.url}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, f"gateway never ready:\n{gw.log_tail()}"
            time.sleep(0.5)
        yield gw
    finally:
        gw.stop()
