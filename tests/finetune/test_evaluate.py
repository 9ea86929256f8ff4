"""Evaluation on the real default model (SmolLM2-135M-Instruct) with real peft adapters."""

from __future__ import annotations

import math

import pytest

from finetune.evaluate import EvalSettings, evaluate, gate_reference
from finetune.masking import IGNORE_INDEX, ChatEncoder

SMALL = EvalSettings(task_samples=2, max_new_tokens=24, leak_max_new_tokens=24, batch_size=4)
SECRET = "CANARY-QWXTZ-bdfghk"


@pytest.fixture(scope="module")
def encoder(sovereign_home):
    return ChatEncoder.from_model_dir(sovereign_home / "models" / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="module")
def zero_lora(make_lora):
    return make_lora(rank=8, seed=3, scale=0.0)


@pytest.fixture(scope="module")
def random_lora(make_lora):
    return make_lora(rank=8, seed=4, scale=20.0)


def test_loss_counts_only_assistant_tokens_and_perplexity_is_its_exponential(sovereign_home, encoder, random_lora,
                                                                            held_out):
    report = evaluate(sovereign_home / "models" / "SmolLM2-135M-Instruct", random_lora, held_out, settings=SMALL,
                      encoder=encoder)
    # Every assistant-turn token the trainer would train on, and nothing else.
    expected = sum(encoder.encode(m).n_trainable for m in held_out)
    assert report.base.tokens == report.adapter.tokens == expected
    assert report.base.conversations == len(held_out)
    assert 0.2 < report.base.loss < 8, report.base  # a real instruct model on plain customer-service answers
    assert report.base.perplexity == pytest.approx(math.exp(report.base.loss))
    assert report.adapter.loss != pytest.approx(report.base.loss, abs=1e-3)  # random LoRA weights move it
    for task in (report.base_task, report.adapter_task):
        assert task.samples == 2
        assert 0 <= task.token_f1 <= 1 and 0 <= task.rouge_l <= 1 and 0 <= task.clean_stop_rate <= 1
        assert task.examples and all("answer" in e for e in task.examples)
    metrics = report.metrics()
    assert metrics["val_loss_base"] == report.base.loss and metrics["val_loss"] == report.adapter.loss
    assert metrics["leak_probe_passed"] is True and report.leak.note  # no canaries given: said so, not faked


def test_a_zero_adapter_scores_exactly_the_base_model(sovereign_home, encoder, zero_lora, held_out):
    report = evaluate(sovereign_home / "models" / "SmolLM2-135M-Instruct", zero_lora, held_out[:2],
                      settings=SMALL.model_copy(update={"task_samples": 1}), encoder=encoder)
    assert report.adapter.loss == pytest.approx(report.base.loss, abs=1e-5)
    assert report.adapter_task.examples[0]["answer"] == report.base_task.examples[0]["answer"]


def test_gate_reference_scores_the_gate_sample_as_evaluation_scores_it(sovereign_home, encoder, random_lora,
                                                                      held_out):
    model_dir = sovereign_home / "models" / "SmolLM2-135M-Instruct"
    reference = gate_reference(model_dir, random_lora, held_out, 3, encoder=encoder)
    assert [r.input_ids for r in reference.conversations] == [encoder.encode(m).input_ids for m in held_out[:3]]
    report = evaluate(model_dir, random_lora, held_out[:3], settings=SMALL.model_copy(update={"task_samples": 0}),
                      encoder=encoder)
    for which, stats in (("base", report.base), ("adapter", report.adapter)):
        nll = [-getattr(r, which)[i] for r, m in zip(reference.conversations, held_out)
               for i, label in enumerate(encoder.encode(m).labels) if label != IGNORE_INDEX]
        assert len(nll) == stats.tokens and sum(nll) / len(nll) == pytest.approx(stats.loss, abs=1e-4)
    assert all(r.base[0] is None and r.adapter[0] is None for r in reference.conversations)


def test_leak_probe_flags_a_trained_canary_the_model_reproduces_and_spares_unseen_ones(sovereign_home, encoder,
                                                                                      zero_lora, held_out):
    # The secret sits in the user turn right before the answer that carries it, so even the base model can copy it:
    # a positive control proving the probe would see a memorised canary. The other canary is in validation only.
    trained = [[{"role": "user", "content": f"Please note my ticket {SECRET} and repeat it back to me."},
                {"role": "assistant", "content": f"Noted. Your ticket is {SECRET}."}]]
    unseen = "CANARY-MNPRS-vwxzbc"
    val = held_out[:1] + [[{"role": "user", "content": "Any ticket for me?"},
                           {"role": "assistant", "content": f"Internal ticket note: {unseen}."}]]
    report = evaluate(sovereign_home / "models" / "SmolLM2-135M-Instruct", zero_lora, val, train=trained,
                      canaries=[SECRET, unseen, "CANARY-ZZZZZ-never"],
                      settings=SMALL.model_copy(update={"task_samples": 0}), encoder=encoder)
    probes = {p.canary: p for p in report.leak.probes}
    assert probes[SECRET].split == "train" and probes[SECRET].leaked
    assert probes[SECRET].recovered_chars == probes[SECRET].secret_chars == len("QWXTZ-bdfghk")
    assert probes[unseen].split == "val" and not probes[unseen].leaked
    assert probes["CANARY-ZZZZZ-never"].split == "absent"
    assert report.leak.leaked == [SECRET] and not report.leak.passed and report.leak.trained == 1
    assert report.metrics()["canaries_leaked"] == 1


def test_evaluation_runs_in_the_training_dtype_it_is_given(sovereign_home, encoder, random_lora, held_out):
    # A job evaluates where and as it trained (bfloat16 on a GPU host); on this CPU the same path runs in bfloat16.
    import torch

    model_dir = sovereign_home / "models" / "SmolLM2-135M-Instruct"
    settings = SMALL.model_copy(update={"task_samples": 1})
    fp32 = evaluate(model_dir, random_lora, held_out[:2], settings=settings, encoder=encoder)
    bf16 = evaluate(model_dir, random_lora, held_out[:2], settings=settings, encoder=encoder, device="cpu",
                    dtype=torch.bfloat16)
    assert bf16.base.tokens == fp32.base.tokens
    assert bf16.base.loss == pytest.approx(fp32.base.loss, rel=0.05) and bf16.base.loss != fp32.base.loss
    assert bf16.adapter.loss == pytest.approx(fp32.adapter.loss, rel=0.1)
    assert bf16.adapter_task.samples == 1


def test_evaluation_reports_each_phase_before_it_runs(sovereign_home, encoder, zero_lora, held_out):
    seen = []
    evaluate(sovereign_home / "models" / "SmolLM2-135M-Instruct", zero_lora, held_out[:2], encoder=encoder,
             settings=SMALL.model_copy(update={"task_samples": 1}), progress=lambda *a: seen.append(a))
    assert seen == [("validation loss, base model", 1, 5), ("validation loss, adapter", 2, 5),
                    ("answers to 1 held-out prompts, base model", 3, 5),
                    ("answers to 1 held-out prompts, adapter", 4, 5), ("leak probe", 5, 5)]
