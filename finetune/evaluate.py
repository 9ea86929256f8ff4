"""Evaluation of an adapter against its base model on held-out conversations.

    report = evaluate(model_dir, adapter_dir, val_conversations, canaries=load_canaries(...))

- loss and perplexity on assistant tokens only, with the trainer's own masking (finetune.masking.ChatEncoder), for
  the base and for base + adapter: one model in memory, the adapter switched off for the base numbers;
- a task metric on a small held-out sample: greedy answers scored against the reference answers with token F1 and
  ROUGE-L (CJK characters count as tokens, so Chinese scores are meaningful);
- the clean-stop rate: answers that end with the end-of-turn token before `max_new_tokens`;
- a leak probe: canary strings planted in training data (ftdata's sample manifest) must not come back, neither when
  the conversation before them is replayed nor when the answer is replayed up to the canary's prefix. Canaries that
  landed in validation are probed too, as a control the model never saw.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from finetune.errors import FinetuneError
from finetune.gate import GateReference, ReferenceLogprobs, gate_sample
from finetune.masking import IGNORE_INDEX, ChatEncoder, Conversation, conversation_parts, training_view, with_messages

CANARY_PREFIX = "CANARY-"


class EvalSettings(BaseModel):
    max_loss_conversations: int | None = Field(64, ge=1)  # held-out conversations for loss; None = all
    task_samples: int = Field(8, ge=0)  # held-out conversations answered greedily
    max_new_tokens: int = Field(64, ge=1)
    leak_max_new_tokens: int = Field(96, ge=1)  # the canary sits at the end of a long answer
    batch_size: int = Field(8, ge=1)
    max_seq_len: int = Field(1024, ge=16)


class LossStats(BaseModel):
    loss: float  # mean cross-entropy per assistant token (nats)
    perplexity: float
    tokens: int
    conversations: int


class TaskStats(BaseModel):
    samples: int
    token_f1: float
    rouge_l: float
    clean_stop_rate: float  # answers ending with end-of-turn before max_new_tokens
    mean_answer_tokens: float
    examples: list[dict[str, Any]] = Field(default_factory=list)  # a few, for people to read


class CanaryProbe(BaseModel):
    canary: str
    split: str  # "train", "val" (a control) or "absent" (dropped by prepare)
    leaked_in_answer: bool
    recovered_chars: int  # characters of the secret reproduced after its prefix
    secret_chars: int
    leaked: bool


class LeakReport(BaseModel):
    probed: int
    trained: int
    leaked: list[str]
    passed: bool
    probes: list[CanaryProbe] = Field(default_factory=list)
    note: str | None = None


class EvalReport(BaseModel):
    base: LossStats
    adapter: LossStats
    base_task: TaskStats | None = None
    adapter_task: TaskStats | None = None
    leak: LeakReport
    settings: EvalSettings

    @property
    def improved(self) -> bool:
        return self.adapter.loss < self.base.loss

    def metrics(self) -> dict[str, Any]:
        """Flat numbers for the adapter manifest and the job's events."""
        out: dict[str, Any] = {
            "val_loss_base": self.base.loss, "val_loss": self.adapter.loss,
            "val_perplexity_base": self.base.perplexity, "val_perplexity": self.adapter.perplexity,
            "val_tokens": self.adapter.tokens, "val_conversations": self.adapter.conversations,
            "val_loss_improved": self.improved,
            "leak_probe_passed": self.leak.passed, "canaries_probed": self.leak.probed,
            "canaries_leaked": len(self.leak.leaked),
        }
        for prefix, task in (("base_", self.base_task), ("", self.adapter_task)):
            if task is not None:
                out.update({f"{prefix}token_f1": task.token_f1, f"{prefix}rouge_l": task.rouge_l,
                            f"{prefix}clean_stop_rate": task.clean_stop_rate})
        return out


# ------------------------------------------------------------------------------------------------ text metrics

_TOKEN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_]+", re.UNICODE)


def text_tokens(text: str) -> list[str]:
    """Lower-cased words, with every CJK character a token of its own (Chinese has no spaces)."""
    return [t.lower() for t in _TOKEN.findall(text)]


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style bag-of-tokens F1."""
    pred, ref = text_tokens(prediction), text_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence of tokens."""
    pred, ref = text_tokens(prediction), text_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    prev = [0] * (len(ref) + 1)
    for p in pred:
        cur = [0]
        for j, r in enumerate(ref):
            cur.append(prev[j] + 1 if p == r else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


# ------------------------------------------------------------------------------------------------ data

def read_conversations(path: Path) -> list[Conversation]:
    """Every row of a prepared JSONL file: its messages, with its tools if it has some (prepare validated them)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(training_view(json.loads(line)))
            except (ValueError, KeyError, TypeError) as exc:
                raise FinetuneError(f"{path}:{n}: not a prepared chat row ({exc}); run `sovereign finetune "
                                    f"prepare` again", code="invalid_prepared_data") from None
    return out


def split_last_answer(conversation: Conversation) -> tuple[Conversation, str] | None:
    """(the conversation up to its last answer in words, that answer); a turn that only calls a tool is skipped."""
    messages = conversation_parts(conversation)[0]
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant" and str(messages[i].get("content") or "").strip():
            return with_messages(conversation, messages[:i]), str(messages[i]["content"])
    return None


def load_canaries(manifest_path: Path) -> list[str]:
    """Canary strings from a sample-data manifest (`canaries: [{"canary": ...}]`); [] when it lists none."""
    data = json.loads(manifest_path.read_text(encoding="utf-8"))
    return [str(c["canary"]) for c in data.get("canaries", []) if isinstance(c, dict) and c.get("canary")]


def find_canary_manifest(train_file: Path | None) -> Path | None:
    """The sidecar manifest of a generated data file: `<stem>.manifest.json` or `manifest.json` beside it."""
    if train_file is None:
        return None
    for candidate in (train_file.with_name(f"{train_file.stem}.manifest.json"), train_file.parent / "manifest.json"):
        if candidate.is_file():
            try:
                if "canaries" in json.loads(candidate.read_text(encoding="utf-8")):
                    return candidate
            except ValueError:
                continue
    return None


# ------------------------------------------------------------------------------------------------ the model

class _Model:
    """One base model with the adapter attached; `base()` switches the adapter off for a block."""

    def __init__(self, model_dir: Path, adapter_dir: Path, encoder: ChatEncoder, device: str = "cpu",
                 dtype: Any = None) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, GenerationConfig
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # job logs want our events, not a bar per weight file
        self.torch = torch
        self.encoder = encoder
        self.device = torch.device(device)
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype or torch.float32, local_files_only=True)
        self.model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).to(self.device)
        self.model.eval()
        eos = {encoder.end_of_turn_id}
        if encoder.tokenizer.eos_token_id is not None:
            eos.add(int(encoder.tokenizer.eos_token_id))
        self.stop_ids = sorted(eos)
        self.gen_config = GenerationConfig(do_sample=False, eos_token_id=self.stop_ids,
                                           pad_token_id=encoder.pad_token_id)

    def base(self):
        return self.model.disable_adapter()

    def loss(self, encoded: Sequence[tuple[list[int], list[int]]], batch_size: int) -> tuple[float, int]:
        """Summed assistant-token NLL and token count; batches of similar length to keep padding small."""
        torch = self.torch
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        total, count = 0.0, 0
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = [encoded[i] for i in order[start:start + batch_size]]
                width = max(len(ids) for ids, _ in rows)
                ids = torch.full((len(rows), width), self.encoder.pad_token_id, dtype=torch.long)
                labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, (row_ids, row_labels) in enumerate(rows):
                    ids[r, :len(row_ids)] = torch.tensor(row_ids)
                    labels[r, :len(row_labels)] = torch.tensor(row_labels)
                    mask[r, :len(row_ids)] = 1
                ids, labels, mask = ids.to(self.device), labels.to(self.device), mask.to(self.device)
                logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                target = labels[:, 1:]
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                                        ignore_index=IGNORE_INDEX, reduction="sum")
                total += float(nll)
                count += int((target != IGNORE_INDEX).sum())
        return total, count

    def token_logprobs(self, ids: list[int]) -> list[float | None]:
        """Log-prob of each token of `ids` given the ones before it, None for the first: vLLM's prompt_logprobs."""
        torch = self.torch
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0, :-1].float()
            targets = torch.tensor(ids[1:], device=self.device).unsqueeze(-1)
            picked = torch.log_softmax(logits, dim=-1).gather(-1, targets)
        return [None, *picked.squeeze(-1).tolist()]

    def generate(self, prompts: Sequence[list[int]], max_new_tokens: int, batch_size: int
                 ) -> list[tuple[str, int, bool]]:
        """Greedy continuations: (text, new tokens, stopped with end-of-turn) per prompt, in order."""
        torch = self.torch
        out: list[tuple[str, int, bool]] = []
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                rows = prompts[start:start + batch_size]
                width = max(len(p) for p in rows)
                # Left padding: every row's last prompt token sits in the last column, where generation starts.
                ids = torch.full((len(rows), width), self.encoder.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, p in enumerate(rows):
                    ids[r, width - len(p):] = torch.tensor(p)
                    mask[r, width - len(p):] = 1
                config = copy.deepcopy(self.gen_config)
                config.max_new_tokens = max_new_tokens
                gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                          generation_config=config)
                for r in range(len(rows)):
                    new = gen[r, width:].tolist()
                    stop_at = next((k for k, t in enumerate(new) if t in self.stop_ids), None)
                    kept = new if stop_at is None else new[:stop_at]
                    text = self.encoder.tokenizer.decode(kept, skip_special_tokens=True)
                    out.append((text, len(kept), stop_at is not None))
        return out


# ------------------------------------------------------------------------------------------------ evaluation

def _loss_stats(total: float, count: int, conversations: int) -> LossStats:
    if count == 0:
        raise FinetuneError("no assistant tokens in the held-out conversations: nothing to evaluate",
                            code="no_trainable_tokens")
    loss = total / count
    return LossStats(loss=loss, perplexity=math.exp(min(loss, 50.0)), tokens=count, conversations=conversations)


def _task(model: _Model, samples: Sequence[tuple[Conversation, str]], prompts: list[list[int]],
          settings: EvalSettings) -> TaskStats:
    answers = model.generate(prompts, settings.max_new_tokens, settings.batch_size)
    f1 = [token_f1(a[0], ref) for a, (_, ref) in zip(answers, samples)]
    rl = [rouge_l(a[0], ref) for a, (_, ref) in zip(answers, samples)]
    examples = [{"prompt": _last_content(conv), "reference": ref, "answer": a[0],
                 "stopped": a[2]} for a, (conv, ref) in list(zip(answers, samples))[:3]]
    n = len(answers)
    return TaskStats(samples=n, token_f1=sum(f1) / n, rouge_l=sum(rl) / n,
                     clean_stop_rate=sum(a[2] for a in answers) / n,
                     mean_answer_tokens=sum(a[1] for a in answers) / n, examples=examples)


def _last_content(conversation: Conversation) -> str:
    messages = conversation_parts(conversation)[0]
    return messages[-1].get("content") or "" if messages else ""


def _find_canary_row(canary: str, splits: dict[str, list[Conversation]]) -> tuple[str, Conversation | None, int]:
    """Where the canary trained: the split, the conversation and the assistant turn that carries it."""
    for split, rows in splits.items():
        for conversation in rows:
            for i, m in enumerate(conversation_parts(conversation)[0]):
                if m.get("role") == "assistant" and canary in str(m.get("content") or ""):
                    return split, conversation, i
    return "absent", None, -1


def probe_canaries(model: _Model, canaries: Iterable[str], splits: dict[str, list[Conversation]],
                   settings: EvalSettings) -> LeakReport:
    """Replay each canary's conversation and its answer up to the canary prefix; the secret must not come back."""
    enc = model.encoder
    planned: list[tuple[str, str, list[int], list[int], str]] = []
    for canary in canaries:
        split, conversation, i = _find_canary_row(canary, splits)
        if conversation is None:  # not in an assistant turn of the prepared data: nothing the loss saw
            planned.append((canary, split, [], [], ""))
            continue
        messages = conversation_parts(conversation)[0]
        content = str(messages[i]["content"])
        cut = content.index(canary) + (len(CANARY_PREFIX) if canary.startswith(CANARY_PREFIX) else 0)
        prompt = enc.render_ids(with_messages(conversation, messages[:i]), add_generation_prompt=True)
        # The answer's own text up to the secret, tokenized as the continuation of the prompt.
        prefix_ids = enc.tokenizer(content[:cut], add_special_tokens=False)["input_ids"]
        planned.append((canary, split, prompt, prompt + list(prefix_ids), canary[cut - content.index(canary):]))
    live = [p for p in planned if p[2]]
    answers = model.generate([p[2] for p in live], settings.leak_max_new_tokens, settings.batch_size)
    continuations = model.generate([p[3] for p in live], 24, settings.batch_size)
    probes, by_canary = [], {p[0]: (a, c) for p, a, c in zip(live, answers, continuations)}
    for canary, split, _, _, secret in planned:
        if canary not in by_canary:
            probes.append(CanaryProbe(canary=canary, split=split, leaked_in_answer=False, recovered_chars=0,
                                      secret_chars=len(secret), leaked=False))
            continue
        answer, cont = by_canary[canary]
        recovered = _common_prefix(cont[0].lstrip(), secret)
        in_answer = canary in answer[0]
        probes.append(CanaryProbe(canary=canary, split=split, leaked_in_answer=in_answer, recovered_chars=recovered,
                                  secret_chars=len(secret), leaked=in_answer or recovered == len(secret) > 0))
    trained = [p for p in probes if p.split == "train"]
    leaked = [p.canary for p in trained if p.leaked]
    note = None if probes else "no canaries to probe (the data came without a sample-data manifest)"
    return LeakReport(probed=len([p for p in probes if p.split != "absent"]), trained=len(trained), leaked=leaked,
                      passed=not leaked, probes=probes, note=note)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def evaluate(model_dir: Path, adapter_dir: Path, val: Sequence[Conversation], *, train: Sequence[Conversation] = (),
             canaries: Sequence[str] = (), settings: EvalSettings | None = None,
             encoder: ChatEncoder | None = None, device: str = "cpu", dtype: Any = None,
             progress: Callable[[str, int, int], None] | None = None) -> EvalReport:
    """Base vs adapter on held-out `val`; `train` is only searched for where the canaries landed.

    `device`/`dtype`: where the trainer ran (a job evaluates on its GPU, not a float32 copy in host memory).
    `progress(what, step, steps)` is called before each of its phases (a job reports it and may stop there).
    """
    settings = settings or EvalSettings()
    encoder = encoder or ChatEncoder.from_model_dir(model_dir)
    model = _Model(model_dir, adapter_dir, encoder, device, dtype)
    samples = [s for s in (split_last_answer(m) for m in val) if s][: settings.task_samples]
    phases = ["validation loss, base model", "validation loss, adapter"]
    if samples:
        phases += [f"answers to {len(samples)} held-out prompts, base model",
                   f"answers to {len(samples)} held-out prompts, adapter"]
    phases.append("leak probe")

    def phase(i: int) -> None:
        if progress is not None:
            progress(phases[i], i + 1, len(phases))

    held_out = list(val)[: settings.max_loss_conversations] if settings.max_loss_conversations else list(val)
    encoded = []
    for messages in held_out:
        try:
            e = encoder.encode(messages, max_len=settings.max_seq_len)
        except FinetuneError:
            continue  # too long or untrainable: prepare reported it; the trainer skips it too
        encoded.append((e.input_ids, e.labels))
    phase(0)
    with model.base():
        base_total, count = model.loss(encoded, settings.batch_size)
    phase(1)
    ada_total, _ = model.loss(encoded, settings.batch_size)

    base_task = adapter_task = None
    if samples:
        prompts = [encoder.render_ids(msgs, add_generation_prompt=True) for msgs, _ in samples]
        phase(2)
        with model.base():
            base_task = _task(model, samples, prompts, settings)
        phase(3)
        adapter_task = _task(model, samples, prompts, settings)

    phase(len(phases) - 1)
    leak = probe_canaries(model, canaries, {"train": list(train), "val": list(val)}, settings)
    return EvalReport(base=_loss_stats(base_total, count, len(encoded)),
                      adapter=_loss_stats(ada_total, count, len(encoded)),
                      base_task=base_task, adapter_task=adapter_task, leak=leak, settings=settings)


def gate_reference(model_dir: Path, adapter_dir: Path, conversations: Sequence[Conversation], samples: int, *,
                   encoder: ChatEncoder | None = None, device: str = "cpu", dtype: Any = None) -> GateReference:
    """What the consistency gate holds vLLM to: base and adapter log-probs of `gate_sample`'s conversations.

    Give it the published folder, not the trainer's output: the gate is about the files vLLM actually loads.
    """
    encoder = encoder or ChatEncoder.from_model_dir(model_dir)
    model = _Model(model_dir, adapter_dir, encoder, device, dtype)
    scored = []
    for messages in gate_sample(conversations, samples):
        ids = encoder.encode(messages).input_ids
        with model.base():
            base = model.token_logprobs(ids)
        scored.append(ReferenceLogprobs(input_ids=ids, base=base, adapter=model.token_logprobs(ids)))
    return GateReference(conversations=scored)
