"""The training–serving consistency gate against the real vLLM CPU server under `sovereign serve`."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from finetune.export import export_adapter
from finetune.gate import GateFailed, GateSettings, require_pass, run_gate
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

    def publish(name: str, **lora):
        adapter = _publish(live_server, make_lora(**lora), name, tmp_path, held_out, make_prepared)
        made.append(adapter)
        return adapter

    yield publish
    registry = AdapterRegistry(live_server.home / "adapters")
    for adapter in made:
        if adapter.path.exists():
            registry.remove(adapter.manifest.name, adapter.manifest.version)


def test_gate_passes_for_a_real_adapter_on_the_served_model(live_server, published, encoder, held_out):
    adapter = published("gate-ok", rank=8, seed=11)
    report = run_gate(encoder=encoder, conversations=held_out, base_model=MODEL, served_name=adapter.served_name,
                      settings=_settings(live_server))
    assert report.passed, report.failure_message()
    checks = {c.name: c for c in report.checks}
    assert set(checks) == {"tokenization", "adapter_loaded", "adapter_active"}
    assert checks["tokenization"].details["prompts"] == 2
    assert checks["adapter_loaded"].details["parent"] == MODEL
    active = checks["adapter_active"].details
    assert active["assistant_tokens"] > 20 and active["mean_abs_logprob_delta"] > 1e-2
    assert active["served_loss_adapter"] != pytest.approx(active["served_loss_base"], abs=1e-3)
    assert require_pass(report) is report


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
