"""The supervisor's adapter sync against vLLM's LoRA endpoints: what is refused for good and what is retried."""

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from serving.adapter_sync import AdapterSync
from serving.adapters import AdapterRegistry
from sovereign.formats import ModelManifest, ModelOrigin

URL = "http://vllm"


@pytest.fixture()
def base() -> ModelManifest:
    return ModelManifest(name="m", architecture="LlamaForCausalLM", dtype="float32", parameter_count=1,
                         origin=ModelOrigin(kind="hf", source="/m"), files=[])


@pytest.fixture()
def peft_folder(tmp_path) -> Path:
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}))
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    return folder


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeVllm:
    """vLLM's load/unload endpoints behind httpx.MockTransport; `answers` are consumed per load call."""

    def __init__(self) -> None:
        self.answers: list[int | Exception] = []
        self.loads: list[str] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.path == "/v1/load_lora_adapter":
            self.loads.append(body["lora_name"])
            answer = self.answers.pop(0) if self.answers else 200
            if isinstance(answer, Exception):
                raise answer
            if answer != 200:
                return httpx.Response(answer, json={"error": {"message": f"said {answer}"}})
        return httpx.Response(200, json={})


def _poll(sync: AdapterSync, vllm: FakeVllm) -> None:
    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(vllm.handler)) as client:
            await sync.reconcile(client, URL)
    asyncio.run(go())


def _synced(tmp_path, base, peft_folder, *names: str, **kw) -> tuple[AdapterRegistry, Clock, "FakeVllm", AdapterSync]:
    """A registry holding `names` (published from the same folder), a fake vLLM and a sync on a fake clock."""
    reg = AdapterRegistry(tmp_path / "reg")
    for name in names:
        reg.publish(peft_folder, name, base)
    clock = Clock()
    return reg, clock, FakeVllm(), AdapterSync(reg, base, 16, clock=clock, **kw)


@pytest.mark.parametrize("failure", [503, 502, 429, httpx.ConnectError("refused"), httpx.ReadTimeout("slow")])
def test_transient_load_failure_is_retried_with_backoff_not_refused(tmp_path, base, peft_folder, failure):
    reg, clock, vllm, sync = _synced(tmp_path, base, peft_folder, "good")
    vllm.answers = [failure]
    _poll(sync, vllm)
    assert sync.state.refused == {} and sync.state.loaded == {}
    _poll(sync, vllm)  # still inside the 1 s backoff: not asked again yet
    assert vllm.loads == ["good@v1"]
    clock.now = 1.0
    _poll(sync, vllm)
    assert vllm.loads == ["good@v1", "good@v1"]
    assert list(sync.state.loaded) == ["good@v1"] and sync.state.refused == {}


def test_retry_backoff_doubles_up_to_its_cap(tmp_path, base, peft_folder):
    reg, clock, vllm, sync = _synced(tmp_path, base, peft_folder, "good", retry_backoff_s=1, retry_backoff_max_s=4)
    vllm.answers = [503] * 6
    attempts = []
    for t in range(20):
        clock.now = float(t)
        before = len(vllm.loads)
        _poll(sync, vllm)
        if len(vllm.loads) > before:
            attempts.append(t)
    assert attempts[:7] == [0, 1, 3, 7, 11, 15, 19]
    assert list(sync.state.loaded) == ["good@v1"]


def test_one_adapter_failing_to_connect_does_not_stop_the_others(tmp_path, base, peft_folder):
    _, _, vllm, sync = _synced(tmp_path, base, peft_folder, "a", "b")
    vllm.answers = [httpx.ConnectError("down"), 200]
    _poll(sync, vllm)
    assert vllm.loads == ["a@v1", "b@v1"] and list(sync.state.loaded) == ["b@v1"]


# 500 too: vLLM answers it for any exception while loading the weights, which is deterministic.
@pytest.mark.parametrize("status", [400, 500])
def test_a_vllm_refusal_holds_for_that_manifest_and_a_republish_is_tried_again(tmp_path, base, peft_folder, status):
    reg, clock, vllm, sync = _synced(tmp_path, base, peft_folder, "x")
    vllm.answers = [status]
    _poll(sync, vllm)
    assert sync.state.refused == {"x@v1": f"vLLM refused it: {status} said {status}"}
    clock.now = 3600.0
    _poll(sync, vllm)
    assert vllm.loads == ["x@v1"]
    # Removed and published again under the same served name between two polls: a new manifest, tried afresh.
    reg.remove("x", "v1")
    reg.publish(peft_folder, "x", base, version="v1")
    _poll(sync, vllm)
    assert vllm.loads == ["x@v1", "x@v1"]
    assert list(sync.state.loaded) == ["x@v1"] and sync.state.refused == {}


def test_an_engine_restart_tries_refused_adapters_again(tmp_path, base, peft_folder):
    _, _, vllm, sync = _synced(tmp_path, base, peft_folder, "x")
    vllm.answers = [500]
    _poll(sync, vllm)
    sync.reset()
    _poll(sync, vllm)
    assert vllm.loads == ["x@v1", "x@v1"] and list(sync.state.loaded) == ["x@v1"]


def test_unservable_adapter_is_refused_with_its_reason_without_asking_vllm(tmp_path, base, peft_folder):
    reg = AdapterRegistry(tmp_path / "reg")
    cfg = json.loads((peft_folder / "adapter_config.json").read_text())
    (peft_folder / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {"q_proj": 64}}))
    reg.publish(peft_folder, "big", base)
    vllm = FakeVllm()
    sync = AdapterSync(reg, base, 16, clock=Clock())
    _poll(sync, vllm)
    assert vllm.loads == []
    assert "rank 64" in sync.state.refused["big@v1"] and "rank_pattern" in sync.state.refused["big@v1"]
