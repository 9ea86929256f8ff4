"""`sovereign up` — the README's first command — brings vLLM and the gateway up and answers through the gateway."""

import json

import pytest
from openai import OpenAI

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

        again = run_sovereign(home, "up", "--port", str(port), "--vllm-port", str(vllm_port),
                              "--health-port", str(health_port), timeout=600)
        assert json.loads(again.stdout.strip().splitlines()[-1])["api_key"] == key  # idempotent, same key
    finally:
        down = run_sovereign(home, "down", check=False)
    assert "gateway: stopped" in down.stderr and "serve: stopped" in down.stderr


def test_up_fails_fast_saying_why_when_vllm_cannot_start(sovereign_home, tmp_path):
    # The commonest first-run failure: vLLM's port is taken. The supervisor retries for ever (a replica should heal);
    # `up` has a person waiting, so it stops after two failed starts and prints vLLM's own reason.
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
