"""`sovereign up` — the README's first command — brings vLLM and the gateway up and answers through the gateway."""

import json
import time

import openai
import psutil
import pytest
from openai import OpenAI

from sovereign.keepalive import FIRST_START_S

from tests.conftest import DEFAULT_MODEL, free_port, run_sovereign

pytestmark = pytest.mark.integration


def test_up_answers_paris_through_the_gateway_and_down_stops_it(sovereign_home, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(sovereign_home / "models")  # the imported default, shared read-only
    port, vllm_port, health_port = free_port(), free_port(), free_port()
    try:
        up = run_sovereign(home, "up", "--port", str(port), "--vllm-port", str(vllm_port),
                           "--health-port", str(health_port), timeout=1200)
        info = json.loads(up.stdout.strip().splitlines()[-1])
        assert info["base_url"] == f"http://127.0.0.1:{port}/v1"
        assert "Paris" in up.stderr  # the smoke answer `up` printed

        key = info["api_key"]
        assert (home / "run" / "platform" / "admin-key").read_text().strip() == key
        client = OpenAI(base_url=info["base_url"], api_key=key, max_retries=0, timeout=300)
        answer = client.chat.completions.create(model=DEFAULT_MODEL, temperature=0, max_tokens=24, messages=[
            {"role": "user", "content": "What is the capital of France?"}]).choices[0].message.content
        assert "Paris" in answer
        assert DEFAULT_MODEL in {m.id for m in client.models.list().data}

        status = run_sovereign(home, "status", "--json")  # exit 0: every part runs and answers
        report = json.loads(status.stdout)
        assert report["ok"] and report["serve"]["engine"] == "ready" and report["gateway"]["ready"]
        assert report["gateway"]["base_url"] == info["base_url"] and report["gateway"]["healthy_replicas"] == 1
        assert report["gateway"]["pii_kinds"] == [] and report["gateway"]["pii_rules_refused"] is None

        again = run_sovereign(home, "up", "--port", str(port), "--vllm-port", str(vllm_port),
                              "--health-port", str(health_port), timeout=600)
        assert json.loads(again.stdout.strip().splitlines()[-1])["api_key"] == key  # idempotent, same key

        # The gateway crashes (or the OOM killer takes it): the door comes back by itself, like the engine does.
        keeper = psutil.Process(int((home / "run" / "platform" / "gateway.pid").read_text()))
        gateway = keeper.children()[0]
        # Past the keeper's first-start window, which a death inside would end (a bad config, not a crash). psutil's
        # create_time rests on the boot time in whole seconds, so it can read up to a second early: 2 s of margin.
        time.sleep(max(0.0, gateway.create_time() + FIRST_START_S + 2 - time.time()))
        gateway.kill()
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.models.list().data:
                    break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "the gateway did not come back after it was killed"
                time.sleep(0.5)
        assert keeper.children()[0].pid != gateway.pid
        assert "process died; restarting" in (home / "run" / "platform" / "gateway.log").read_text()

        # The serving supervisor SIGKILLed: its vLLM goes with it (no orphan holding the port), and both come back.
        serve_keeper = psutil.Process(int((home / "run" / "platform" / "serve.pid").read_text()))
        supervisor = serve_keeper.children()[0]
        engine = supervisor.children(recursive=True)
        assert engine, "vLLM runs under the supervisor"
        supervisor.kill()
        gone, alive = psutil.wait_procs(engine, timeout=60)
        assert not alive, f"vLLM outlived its supervisor: {alive}"
        deadline = time.monotonic() + 600
        while True:
            try:
                answer = client.chat.completions.create(model=DEFAULT_MODEL, temperature=0, max_tokens=24, messages=[
                    {"role": "user", "content": "What is the capital of France?"}]).choices[0].message.content
                break
            except (openai.APIConnectionError, openai.InternalServerError):
                assert time.monotonic() < deadline, "serving did not come back after its supervisor was killed"
                time.sleep(2)
        assert "Paris" in answer and serve_keeper.children()[0].pid != supervisor.pid
    finally:
        down = run_sovereign(home, "down", check=False)
    assert "gateway: stopped" in down.stderr and "serve: stopped" in down.stderr
    assert not keeper.is_running() and not psutil.pid_exists(keeper.pid)
    stopped = run_sovereign(home, "status", check=False)
    assert stopped.returncode == 1
    assert "serve: not running" in stopped.stderr and "gateway: not running" in stopped.stderr


def test_up_fails_fast_saying_why_when_vllm_cannot_start(sovereign_home, tmp_path):
    # The commonest first-run failure: vLLM's port is taken. The supervisor retries for ever (a replica should heal);
    # `up` has a person waiting, so it stops after two failed starts and prints the reason.
    import socket

    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(sovereign_home / "models")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        up = run_sovereign(home, "up", "--port", str(free_port()), "--vllm-port", str(taken.getsockname()[1]),
                           "--health-port", str(free_port()), check=False, timeout=600)
    finally:
        taken.close()
    assert up.returncode == 1
    assert "failed to start 2 times" in up.stderr and "Address already in use" in up.stderr
    down = run_sovereign(home, "down", check=False)
    assert "serve: not running" in down.stderr  # not left behind retrying
