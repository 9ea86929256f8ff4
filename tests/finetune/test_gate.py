"""The training–serving consistency gate against the real vLLM CPU server under `sovereign serve`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from finetune.evaluate import gate_reference
from finetune.export import export_adapter
from finetune.gate import GateFailed, GateSettings, measure_tool_calls, require_pass, run_gate, tool_call_samples
from finetune.masking import ChatEncoder
from serving.adapters import AdapterRegistry
from sovereign.settings import HomeSettings

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"


def _settings(server) -> GateSettings:
    return GateSettings(serving_url=server.base_url, health_url=server.health_url, samples=2, load_timeout_s=120)


def _publish(server, folder, name, tmp_path, held_out, make_prepared):
    prepared = make_prepared(tmp_path / f"prepared-{name}", held_out, held_out)
    return export_adapter(folder, name=name, base_model=MODEL, prepared_dir=prepared, config={}, seed=0, metrics={},
                          home=HomeSettings(home=server.home))


@pytest.fixture(scope="module")
def encoder(sovereign_home):
    return ChatEncoder.from_model_dir(sovereign_home / "models" / MODEL)


@pytest.fixture()
def published(live_server, make_lora, tmp_path, held_out, make_prepared):
    """A real LoRA adapter in the live server's registry; removed afterwards so the server's LoRA slots stay free."""
    made = []

    def publish(name: str, folder=None, **lora):
        adapter = _publish(live_server, folder or make_lora(**lora), name, tmp_path, held_out, make_prepared)
        made.append(adapter)
        return adapter

    yield publish
    registry = AdapterRegistry(live_server.home / "adapters")
    for adapter in made:
        if adapter.path.exists():
            registry.remove(adapter.manifest.name, adapter.manifest.version)


def test_gate_passes_for_a_real_adapter_on_the_served_model(live_server, published, encoder, held_out,
                                                            sovereign_home):
    # B scaled by 1, not make_lora's 20: the size of a trained adapter (log-probs move ~1.5 nats a token). B x 20 moves
    # them ~16, a wrecked model whose gap to vLLM (rounding grows with the effect) is past what adapter_matches allows.
    adapter = published("gate-ok", rank=8, seed=11, scale=1.0)
    # From the registry's copy, as the job runner does.
    reference = gate_reference(sovereign_home / "models" / MODEL, adapter.path, held_out, 2, encoder=encoder)
    report = run_gate(encoder=encoder, conversations=held_out, base_model=MODEL, served_name=adapter.served_name,
                      settings=_settings(live_server), reference=reference)
    assert report.passed, report.failure_message()
    checks = {c.name: c for c in report.checks}
    assert set(checks) == {"tokenization", "adapter_loaded", "adapter_active", "adapter_matches"}
    assert checks["tokenization"].details["prompts"] == 2
    assert checks["adapter_loaded"].details["parent"] == MODEL
    active = checks["adapter_active"].details
    assert active["assistant_tokens"] > 20 and active["mean_abs_logprob_delta"] > 1e-2
    assert active["served_loss_adapter"] != pytest.approx(active["served_loss_base"], abs=1e-3)
    matches = checks["adapter_matches"].details
    assert matches["assistant_tokens"] == active["assistant_tokens"]
    assert matches["mismatch"] <= matches["tolerance"] and matches["noise"] < 1e-2  # float32 on both sides
    assert matches["effect"] > 100 * matches["mismatch"]
    assert require_pass(report) is report


def test_gate_fails_clearly_when_vllm_serves_the_adapter_only_in_part(live_server, published, encoder, held_out,
                                                                     sovereign_home, make_lora, tmp_path):
    trained = make_lora(rank=8, seed=14, scale=1.0)
    # What vLLM would serve if it ignored v_proj: the same adapter with those modules' LoRA B zeroed.
    partial = tmp_path / "partial"
    shutil.copytree(trained, partial)
    weights = load_file(partial / "adapter_model.safetensors")
    zeroed = [k for k in weights if ".v_proj.lora_B." in k]
    assert zeroed
    save_file({k: torch.zeros_like(v) if k in zeroed else v for k, v in weights.items()},
              partial / "adapter_model.safetensors", metadata={"format": "pt"})
    adapter = published("gate-partial", partial)
    reference = gate_reference(sovereign_home / "models" / MODEL, trained, held_out, 2, encoder=encoder)
    report = run_gate(encoder=encoder, conversations=held_out, base_model=MODEL, served_name=adapter.served_name,
                      settings=_settings(live_server), reference=reference)
    checks = {c.name: c for c in report.checks}
    assert checks["tokenization"].passed and checks["adapter_loaded"].passed
    assert checks["adapter_active"].passed  # what the gate checked before: it changes something
    matches = checks["adapter_matches"]
    assert not matches.passed and not report.passed
    assert f"vLLM serves {adapter.served_name} differently from how it was trained" in matches.message
    assert "only in part" in matches.message
    assert matches.details["mismatch"] > 10 * matches.details["tolerance"]
    with pytest.raises(GateFailed, match="adapter_matches"):
        require_pass(report)


def test_gate_fails_clearly_when_the_trainer_renders_a_different_chat_template(live_server, published, sovereign_home,
                                                                             held_out):
    adapter = published("gate-drift", rank=8, seed=12)
    tokenizer = AutoTokenizer.from_pretrained(str(sovereign_home / "models" / MODEL), local_files_only=True)
    # A drift the trainer can still encode (every role header gains a colon), so only the gate can notice it.
    drifted = (tokenizer.chat_template.replace("message['role'] + '\n'", "message['role'] + ':\n'")
               .replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant:\n'"))
    assert drifted.count(":\n'") == 2
    assert drifted != tokenizer.chat_template
    tokenizer.chat_template = drifted
    report = run_gate(encoder=ChatEncoder(tokenizer), conversations=held_out, base_model=MODEL,
                      served_name=adapter.served_name, settings=_settings(live_server))
    assert not report.passed
    failed = [c for c in report.checks if not c.passed]
    assert [c.name for c in failed] == ["tokenization"]
    assert "tokenize differently in the trainer and in the served vLLM" in failed[0].message
    assert ":\n" in failed[0].details["mismatches"][0]["trainer_text"]
    with pytest.raises(GateFailed, match="chat template or tokenizer drift"):
        require_pass(report)


def test_gate_fails_clearly_when_the_adapter_is_a_no_op(live_server, published, encoder, held_out):
    adapter = published("gate-noop", rank=8, seed=13, scale=0.0)  # LoRA B = 0: B @ A adds nothing
    report = run_gate(encoder=encoder, conversations=held_out, base_model=MODEL, served_name=adapter.served_name,
                      settings=_settings(live_server))
    checks = {c.name: c for c in report.checks}
    assert checks["tokenization"].passed and checks["adapter_loaded"].passed
    assert not checks["adapter_active"].passed and not report.passed
    assert "does not change what vLLM serves" in checks["adapter_active"].message
    assert checks["adapter_active"].details["mean_abs_logprob_delta"] < 1e-3


def test_gate_fails_clearly_when_the_adapter_never_reaches_the_server(live_server, encoder, held_out):
    settings = _settings(live_server).model_copy(update={"load_timeout_s": 2})
    report = run_gate(encoder=encoder, conversations=held_out, base_model=MODEL, served_name="never-published@v1",
                      settings=settings)
    checks = {c.name: c for c in report.checks}
    assert not checks["adapter_loaded"].passed
    assert "did not appear" in checks["adapter_loaded"].message
    assert checks["adapter_active"].message == "not checked: the adapter is not served"


def _tool_row(question: str, name: str, arguments: str) -> dict:
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
             for n in ("lookup_order", "create_return")]
    call = {"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}
    return {"tools": tools, "messages": [
        {"role": "user", "content": question}, {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{}"}, {"role": "assistant", "content": "Done."}]}


class _ServedCalls:
    """The served models' parsed calls, by model and question (measure_tool_calls asks `tool_calls` only)."""

    def __init__(self, answers: dict) -> None:
        self.answers = answers

    def tool_calls(self, model, conversation):
        question = conversation["messages"][-1]["content"]
        return [(n, json.loads(a)) for n, a in self.answers[model].get(question, [])], "text"


def test_tool_calls_are_scored_against_the_held_out_calls_names_and_arguments():
    held_out = [_tool_row("Where is NW-1?", "lookup_order", '{"order_id":"NW-1"}'),
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}],  # no tools: skipped
                _tool_row("Return NW-2, it broke", "create_return", '{"order_id":"NW-2","reason":"damaged"}')]
    samples = tool_call_samples(held_out, 8)
    assert [(p["messages"][-1]["content"], len(p["messages"]), want) for p, want in samples] == [
        ("Where is NW-1?", 1, [("lookup_order", {"order_id": "NW-1"})]),
        ("Return NW-2, it broke", 1, [("create_return", {"order_id": "NW-2", "reason": "damaged"})])]
    served = _ServedCalls({
        "base": {"Return NW-2, it broke": [("lookup_order", '{"order_id": "NW-2"}')]},
        "tuned": {"Where is NW-1?": [("lookup_order", '{"order_id": "NW-1"}')],  # other spacing: the same call
                  "Return NW-2, it broke": [("create_return", '{"order_id": "NW-2", "reason": "other"}')]}})
    stats = measure_tool_calls(served, samples, {"base": "base", "adapter": "tuned"})
    assert (stats["base"].called, stats["base"].right_function, stats["base"].exact) == (1, 0, 0)
    assert (stats["adapter"].called, stats["adapter"].right_function, stats["adapter"].exact) == (2, 2, 1)
    assert stats["adapter"].summary() == "1/2 exact, 2 right function, 2 called"
    assert stats["base"].counts("base_") == {"base_tool_calls_prompts": 2, "base_tool_calls_called": 1,
                                             "base_tool_calls_right_function": 0, "base_tool_calls_exact": 0}
    assert stats["adapter"].examples[0]["calls"] == [["lookup_order", {"order_id": "NW-1"}]]
