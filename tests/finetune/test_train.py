"""The training loop: packing boundaries, loss normalisation, exact resume after a kill, early stopping, outputs.

Most tests train a tiny random Llama (2 layers, width 64) that carries SmolLM2's real tokenizer and chat template,
imported into a model store like any model, so they run in seconds on 2 cores; one test trains the real default
model and checks that the validation loss goes down.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.config import FinetuneConfig
from finetune.errors import FinetuneError
from finetune.packing import collate, packing_is_isolated
from finetune.train import LoraRecipe, settings_fingerprint, train
from serving.store import DEFAULT_MODEL_NAME, ModelStore
from sovereign.offline import offline_env
from sovereign.settings import HomeSettings
from trainer_data import write_prepared

REPO = Path(__file__).resolve().parents[2]
TINY = "tiny-llama"


@pytest.fixture(scope="module")
def tiny_home(sovereign_home: Path, tmp_path_factory) -> HomeSettings:
    """A store holding `tiny-llama`: random weights, the default model's tokenizer and chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    src = sovereign_home / "models" / DEFAULT_MODEL_NAME
    folder = tmp_path_factory.mktemp("tiny-src")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / name, folder / name)
    home = tmp_path_factory.mktemp("tiny-home")
    ModelStore(home / "models").import_hf(folder, TINY)
    return HomeSettings(home=home)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("prepared"), n_train=48, n_val=8)


def tiny_config(dropout: float = 0.1, **training) -> FinetuneConfig:
    base = dict(max_steps=6, micro_batch_tokens=512, max_seq_len=256, gradient_accumulation_steps=2,
                learning_rate=3e-3, lr_scheduler="cosine", warmup_ratio=0.2, eval_every_steps=2,
                checkpoint_every_steps=2, keep_checkpoints=2, early_stopping_patience=None, seed=3)
    base.update(training)
    return FinetuneConfig.load(None, name="tiny", model=TINY, lora={"r": 8, "alpha": 16, "dropout": dropout},
                               training=base)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_packed_conversations_do_not_attend_across_boundaries(tiny_home, prepared):
    recipe = LoraRecipe(tiny_config(), prepared, prepared.parent / "unused", on_event=None, home=tiny_home,
                        progress=False)
    recipe.setup(resume=False)
    assert recipe.packing
    base = recipe.model.get_base_model()
    decoder = base.get_decoder()
    recipe.model.eval()
    with torch.no_grad():
        packed = collate([[0, 1, 2]], recipe.train_set, recipe.encoder.pad_token_id)
        hidden = decoder(input_ids=packed.input_ids, position_ids=packed.position_ids).last_hidden_state
        start = 0
        for i in (0, 1, 2):
            alone = collate([[i]], recipe.train_set, recipe.encoder.pad_token_id)
            ref = decoder(input_ids=alone.input_ids, position_ids=alone.position_ids).last_hidden_state
            n = alone.input_ids.shape[1]
            torch.testing.assert_close(hidden[:, start:start + n], ref, atol=1e-5, rtol=1e-4)
            start += n


def test_default_model_keeps_packed_conversations_apart(sovereign_home):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sovereign_home / "models" / DEFAULT_MODEL_NAME,
                                                 dtype=torch.float32, attn_implementation="sdpa")
    assert packing_is_isolated(model, vocab_size=model.config.vocab_size)


def test_loss_is_normalised_by_trainable_tokens_across_the_accumulated_step(tiny_home, prepared):
    # no dropout, so the three computations below see the same function
    recipe = LoraRecipe(tiny_config(dropout=0.0), prepared, prepared.parent / "unused", on_event=None,
                        home=tiny_home, progress=False)
    recipe.setup(resume=False)
    # two micro batches with very different numbers of trainable tokens
    by_targets = sorted(range(len(recipe.train_set)), key=lambda i: recipe.train_set[i].n_targets)
    small, large = [[by_targets[0]]], [[by_targets[-1]], [by_targets[-2]]]

    def grads() -> list[torch.Tensor]:
        out = [p.grad.detach().clone() for p in recipe.params]
        recipe.optimizer.zero_grad(set_to_none=True)
        return out

    loss, n_targets, _ = recipe.accumulate([small, large])
    accumulated = grads()
    # reference: one batch holding every row, loss = sum over tokens / tokens
    whole = collate(small + large, recipe.train_set, recipe.encoder.pad_token_id)
    assert whole.n_targets == n_targets
    ref_loss = recipe.forward_loss_sum(whole) / whole.n_targets
    ref_loss.backward()
    reference = grads()
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    for a, b in zip(accumulated, reference):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # and a mean of per-micro-batch means is measurably different (so the test can tell them apart)
    for mb in (small, large):
        b = collate(mb, recipe.train_set, recipe.encoder.pad_token_id)
        (recipe.forward_loss_sum(b) / b.n_targets / 2).backward()
    mean_of_means = grads()
    assert any(not torch.allclose(a, b, atol=1e-6, rtol=1e-3) for a, b in zip(mean_of_means, reference))


@pytest.fixture(scope="module")
def uninterrupted(tiny_home, prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    events: list[tuple[str, str, dict]] = []
    result = train(tiny_config(), prepared, out, home=tiny_home, on_event=lambda *e: events.append(e),
                   progress=False)
    return out, result, events


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from finetune.config import FinetuneConfig
from finetune.train import train
from sovereign.settings import HomeSettings
cfg = FinetuneConfig.model_validate_json(sys.argv[1])
def on_event(kind, message, data):
    if kind == "metrics" and data["step"] == 3:  # checkpoint 2 is on disk, step 3 half-logged: kill -9
        os.kill(os.getpid(), signal.SIGKILL)
train(cfg, Path(sys.argv[2]), Path(sys.argv[3]), home=HomeSettings(home=Path(sys.argv[4])), on_event=on_event,
      progress=False)
"""


def test_killed_run_resumes_to_the_same_losses(tiny_home, prepared, uninterrupted, tmp_path):
    ref_out, ref_result, _ = uninterrupted
    out = tmp_path / "killed"
    cfg = tiny_config()
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, cfg.model_dump_json(), str(prepared), str(out),
                           str(tiny_home.home)], env=offline_env(PYTHONPATH=str(REPO)), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (out / "checkpoints" / "2" / "metrics.json").is_file()
    assert not (out / "adapter").exists()

    events: list[tuple[str, str, dict]] = []
    result = train(cfg, prepared, out, home=tiny_home, on_event=lambda *e: events.append(e), progress=False)
    assert any(kind == "message" and "resumed from checkpoint 2" in msg for kind, msg, _ in events)
    got, want = records(out), records(ref_out)
    assert [(r["type"], r["step"]) for r in got] == [(r["type"], r["step"]) for r in want]
    for a, b in zip(got, want):
        key = "loss" if a["type"] == "train" else "val_loss"
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a, b)
    assert result.best_step == ref_result.best_step
    # the adapters themselves agree
    from safetensors.torch import load_file

    wa = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    wb = load_file(str(ref_result.adapter_dir / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def test_resume_against_changed_data_is_refused(tiny_home, prepared, uninterrupted, tmp_path):
    ref_out, _, _ = uninterrupted
    out = tmp_path / "copy"
    shutil.copytree(ref_out, out)
    other = write_prepared(tmp_path / "other", n_train=48, n_val=8, seed=99)
    with pytest.raises(FinetuneError) as err:
        train(tiny_config(), other, out, home=tiny_home, progress=False)
    assert err.value.code == "resume_mismatch"


def test_run_writes_a_servable_adapter_checkpoints_metrics_and_curve(uninterrupted):
    out, result, events = uninterrupted
    cfg = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["use_dora"] is False and not cfg.get("modules_to_save")
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"}
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    # newest 2 checkpoints kept (plus the best one), each with its metrics
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir())
    assert {4, 6} <= set(steps) and 2 not in steps or result.best_step == 2
    m = json.loads((out / "checkpoints" / "6" / "metrics.json").read_text())
    assert m["step"] == 6 and m["train_loss"] > 0 and m["valid_loss"] > 0
    recs = records(out)
    assert [r["step"] for r in recs if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in recs if r["type"] == "eval"] == [0, 2, 4, 6]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kinds = [k for k, _, _ in events]
    assert kinds[0] == "data" and "setup" in kinds and kinds.count("metrics") == 6 and kinds[-1] == "done"
    assert result.trained_tokens == sum(r["tokens"] for r in recs if r["type"] == "train")
    assert result.metrics["base_val_loss"] == recs[0]["val_loss"]


def test_early_stopping_keeps_the_best_adapter(tiny_home, prepared, tmp_path):
    # no evaluation can beat step 0 by min_delta = 100 nats; patience 1 stops at the first one after it
    cfg = tiny_config(early_stopping_patience=1, early_stopping_min_delta=100.0)
    events: list[tuple[str, str, dict]] = []
    result = train(cfg, prepared, tmp_path, home=tiny_home, on_event=lambda *e: events.append(e), progress=False)
    assert result.metrics["stopped_early"] and result.metrics["steps"] == 2
    assert result.best_step == 0
    assert any(k == "early_stop" for k, _, _ in events)
    # the adapter handed back is the step-0 one: LoRA B is still zero, i.e. the base model
    from safetensors.torch import load_file

    weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert all(float(w.abs().max()) == 0.0 for k, w in weights.items() if "lora_B" in k)


def test_missing_model_is_a_clear_error(tmp_path, prepared):
    cfg = FinetuneConfig.load(None, name="x", model="no-such-model")
    with pytest.raises(FinetuneError) as err:
        train(cfg, prepared, tmp_path, home=HomeSettings(home=tmp_path), progress=False)
    assert err.value.code == "model_not_found" and "sovereign models import" in str(err.value)


@pytest.mark.slow
def test_short_real_run_lowers_validation_loss_on_the_default_model(sovereign_home, tmp_path):
    prepared = write_prepared(tmp_path / "prepared", n_train=40, n_val=6, seed=5)
    cfg = FinetuneConfig.named("ci-smoke", training={
        "max_steps": 4, "micro_batch_tokens": 512, "max_seq_len": 256, "gradient_accumulation_steps": 1,
        "learning_rate": 2e-3, "lr_scheduler": "constant", "warmup_ratio": 0.0, "eval_every_steps": 4,
        "checkpoint_every_steps": 4, "early_stopping_patience": None, "seed": 0})
    result = train(cfg, prepared, tmp_path / "out", home=HomeSettings(home=sovereign_home), progress=False)
    assert result.metrics["best_val_loss"] < result.metrics["base_val_loss"] - 0.1, result.metrics
    assert result.best_step == 4


def test_a_run_checkpointed_before_batch_size_existed_still_resumes():
    """Its checkpoint's fingerprint was made from settings without the field; while unset, the field stays out."""
    cfg = FinetuneConfig.named("ci-smoke")
    before = cfg.model_dump_json(include={"model", "lora", "training"}).replace('"batch_size":null,', "")
    assert '"batch_size"' not in before and settings_fingerprint(cfg) == before
    sized = cfg.model_copy(update={"training": cfg.training.model_copy(update={"batch_size": 8})})
    assert '"batch_size":8' in settings_fingerprint(sized)  # a run that sets it resumes only with the same value
