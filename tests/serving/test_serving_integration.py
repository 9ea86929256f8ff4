"""The real vLLM CPU server under `sovereign serve`, driven through the real `openai` SDK."""

import json
import os
import shutil
import time

import httpx
import psutil
import pytest
from openai import OpenAI

from serving import cpu_linear_ops
from serving.adapters import AdapterRegistry
from serving.store import ModelStore

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def greedy(server, model: str, messages=QUESTION, max_tokens: int = 24) -> str:
    r = client(server).chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    return r.choices[0].message.content


def served_models(server) -> set[str]:
    return {m.id for m in client(server).models.list().data}


def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_chat_answers_paris(live_server):
    assert "Paris" in greedy(live_server, live_server.model)


def test_streamed_answer_arrives_in_chunks_and_says_paris(live_server):
    stream = client(live_server).chat.completions.create(model=live_server.model, messages=QUESTION, max_tokens=24,
                                                         temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 2
    assert "Paris" in "".join(pieces)


def test_supervisor_health_reports_model_verified_and_ready(live_server):
    status = httpx.get(f"{live_server.health_url}/readyz").json()
    assert status["ready"] and status["model_verified"] and status["engine"] == "ready"
    assert httpx.get(f"{live_server.health_url}/healthz").status_code == 200


def test_the_served_model_cannot_be_removed_from_under_its_server(live_server):
    from tests.conftest import run_sovereign

    assert live_server.proc.pid in ModelStore(live_server.home / "models").served_by(live_server.model)
    refused = run_sovereign(live_server.home, "models", "remove", live_server.model, check=False)
    said = " ".join(refused.stderr.split())  # the console wraps at 80 columns
    assert refused.returncode != 0
    assert f"is being served (sovereign serve, pid {live_server.proc.pid})" in said
    assert ModelStore(live_server.home / "models").verify(live_server.model)
    assert "Paris" in greedy(live_server, live_server.model)


def test_published_adapter_appears_changes_output_and_disappears_when_removed(live_server, make_lora):
    base = ModelStore(live_server.home / "models").get(live_server.model)
    registry = AdapterRegistry(live_server.home / "adapters")
    before = greedy(live_server, live_server.model)
    adapter = registry.publish(make_lora(rank=8, seed=1), "support", base, max_lora_rank=16)
    wait_for(lambda: adapter.served_name in served_models(live_server), what="adapter in /v1/models")
    assert greedy(live_server, adapter.served_name) != before
    assert greedy(live_server, live_server.model) == before  # the base is untouched
    registry.remove("support")
    wait_for(lambda: adapter.served_name not in served_models(live_server), what="adapter gone from /v1/models")


def test_unservable_adapter_is_refused_with_reason_and_server_keeps_serving(live_server, make_lora, tmp_path):
    base = ModelStore(live_server.home / "models").get(live_server.model)
    registry = AdapterRegistry(live_server.home / "adapters")
    adapter = registry.publish(make_lora(rank=8, seed=2), "dora", base)
    # Edit the published files the way a hand copy would: the supervisor must catch it, not vLLM.
    cfg_path = adapter.path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_dora"] = True
    cfg_path.write_text(json.dumps(cfg))
    refused = wait_for(lambda: live_server.status()["adapters_refused"].get("dora@v1"), what="refusal")
    assert "DoRA" in refused
    assert "dora@v1" not in served_models(live_server)
    assert "Paris" in greedy(live_server, live_server.model)
    registry.remove("dora")
    wait_for(lambda: "dora@v1" not in live_server.status()["adapters_refused"], what="refusal cleared")


def test_the_cpu_profiles_vllm_plugins_run_inside_the_engine(live_server):
    """The answers above came from vLLM with our plugins in its worker: float16 linear weights (int4 for exact 4-bit
    layers where the CPU computes it fast) and grouped LoRA ops."""
    log = "\n".join(p.read_text(errors="replace") for p in live_server.home.glob("run/serve-*/vllm.log"))
    assert "linear layers run with float16 weights (fbgemm)" in log
    assert "grouped multi-LoRA ops installed" in log
    assert ("run with int4 weights for batches of up to 16 tokens" in log) == cpu_linear_ops.int4_is_fast()


def test_no_platform_process_talks_to_anything_but_loopback(live_server):
    greedy(live_server, live_server.model)
    procs = [psutil.Process(live_server.proc.pid)]
    procs += procs[0].children(recursive=True)
    remote = {c.raddr.ip for p in procs for c in p.net_connections(kind="inet") if c.raddr}
    assert remote and remote <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, remote


def test_base_requests_batched_with_adapter_requests_get_no_adapter(live_server, make_lora):
    """Every LoRA slot filled, then a base request decoded in the same batches as adapter requests: it must answer
    exactly as when batched with other base requests (vLLM's CPU ops gave it the last slot's adapter)."""
    from concurrent.futures import ThreadPoolExecutor

    base = ModelStore(live_server.home / "models").get(live_server.model)
    registry = AdapterRegistry(live_server.home / "adapters")
    names = [f"slot{i}" for i in range(4)]  # the cpu profile's max_loras
    served = [registry.publish(make_lora(rank=8, seed=10 + i), name, base, max_lora_rank=16).served_name
              for i, name in enumerate(names)]
    try:
        wait_for(lambda: set(served) <= served_models(live_server), what="four adapters in /v1/models")
        for name in served:  # each takes a slot on the engine
            greedy(live_server, name, max_tokens=2)
        others = [[{"role": "user", "content": f"Write a short note about order {n}."}] for n in range(4)]

        def together(models: list[str]) -> str:
            with ThreadPoolExecutor(5) as pool:
                target = pool.submit(greedy, live_server, live_server.model, QUESTION, 32)
                for model, messages in zip(models, others):
                    pool.submit(greedy, live_server, model, messages, 48)
                return target.result()

        with_base = together([live_server.model] * 4)
        with_adapters = together(served)
        assert "Paris" in with_base
        assert with_adapters == with_base
    finally:
        for name in names:
            registry.remove(name)
        wait_for(lambda: not set(served) & served_models(live_server), what="adapters gone")


def test_killed_engine_is_restarted_and_serves_again(live_server):
    status = live_server.status()
    restarts, pid = status["restarts"], status["pid"]
    psutil.Process(pid).kill()
    wait_for(lambda: live_server.status()["restarts"] == restarts + 1, what="restart")
    after = live_server.wait_ready()
    assert after["pid"] != pid
    # the killed server's engine core and workers went with it, not left as orphans holding memory and cores
    wait_for(lambda: not [p for p in psutil.process_iter() if _pgid(p.pid) == pid],
             what="the old engine's processes gone")
    assert "Paris" in greedy(live_server, live_server.model)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
