"""LoRA training on a model from the store: prepared conversations in, a vLLM-servable peft adapter out.

    from finetune.config import FinetuneConfig
    from finetune.train import train
    result = train(FinetuneConfig.named("ci-smoke"), "prepared/", "out/")   # out/adapter, out/metrics.jsonl, ...

Shaped like torchtune's lora_finetune_single_device recipe: setup / train / save, one readable loop, no hidden
trainer. What a demanding user would check, and where it is done:
- the model's own chat template renders every conversation; loss only on assistant turns + end-of-turn (masking.py);
- several conversations per row, never attending across boundaries (packing.py);
- gradient accumulation normalised by the number of trainable tokens in the whole accumulated step, not a mean of
  per-micro-batch means (a micro batch with 10 answer tokens must not weigh as much as one with 1,000);
- logits are computed only where the loss looks (assistant tokens), not over the 49k-word vocabulary for every
  prompt token: the largest single saving on CPU;
- checkpoints with adapter + optimizer + scheduler + RNG + data position; a killed run resumes to the same losses;
- validation loss before training (= the base model's) and every `eval_every_steps`; early stopping on it; the
  best evaluation's adapter is the one returned.

Events: `on_event(type, message, data)` receives "setup", "data", "metrics" (each step), "eval", "checkpoint",
"early_stop", "warning" and "done"; the jobs runner turns them into events.jsonl lines.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.checkpoints import (ADAPTER, TrainerState, list_checkpoints, load_checkpoint, load_trainer_state,
                                  save_checkpoint)
from finetune.config import FinetuneConfig
from finetune.errors import FinetuneError
from finetune.fast_dropout import use_fast_lora_dropout
from finetune.masking import IGNORE_INDEX, ChatEncoder, training_view
from finetune.metrics import MetricsLog, plot_loss_curve
from finetune.packed_attention import NAME as PACKED_ATTENTION
from finetune.packing import Batch, Example, collate, packing_is_isolated, plan_epoch, plan_training
from sovereign.formats import MODEL_MANIFEST, ModelManifest, write_json_atomic
from sovereign.settings import HomeSettings

EventSink = Callable[[str, str, dict[str, Any]], None]


@dataclass
class TrainResult:
    adapter_dir: Path
    best_step: int
    metrics: dict[str, Any]
    trained_tokens: int


def train(config: FinetuneConfig, prepared_dir: str | Path, out_dir: str | Path, *, on_event: EventSink | None = None,
          resume: bool = True, home: HomeSettings | None = None, progress: bool | None = None) -> TrainResult:
    """Train a LoRA adapter on `prepared_dir` (train.jsonl, val.jsonl) into `out_dir`; resume from its checkpoints.

    `progress=None` shows a rich progress bar when stderr is a terminal.
    """
    recipe = LoraRecipe(config, Path(prepared_dir), Path(out_dir), on_event=on_event, home=home or HomeSettings(),
                        progress=sys.stderr.isatty() if progress is None else progress)
    recipe.setup(resume=resume)
    recipe.train()
    return recipe.save()


def packed_loss_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy over a packed batch's trainable tokens; logits only where the loss looks."""
    base = model.get_base_model()
    hidden = base.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                use_cache=False).last_hidden_state
    where = batch.targets != IGNORE_INDEX
    logits = base.get_output_embeddings()(hidden[where])
    return torch.nn.functional.cross_entropy(logits.float(), batch.targets[where], reduction="sum")


def settings_fingerprint(config: FinetuneConfig) -> str:
    """The settings a checkpoint records and a resume must match. A setting added in a later release is left out
    while unset, so a run checkpointed before the upgrade still resumes instead of starting over."""
    added_later = {"batch_size"} if config.training.batch_size is None else set()
    return config.model_dump_json(include={"model", "lora", "training"}, exclude={"training": added_later})


def read_conversations(path: Path) -> list[Any]:
    """Each line of a prepared OpenAI chat JSONL file: its messages, with its tools if it has some."""
    if not path.is_file():
        raise FinetuneError(f"{path}: no such file; run `sovereign finetune prepare` first", code="no_training_data")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            conversation = training_view(json.loads(line))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise FinetuneError(f"{path}:{n}: not a prepared chat example ({exc}); re-run `sovereign finetune "
                                "prepare`", code="invalid_prepared_data") from None
        out.append(conversation)
    return out


def pick_device_dtype(config: FinetuneConfig) -> tuple[torch.device, torch.dtype]:
    t = config.training
    device = t.device if t.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("training.device is cuda but no CUDA device is visible", code="invalid_config")
    dtype = t.dtype if t.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return torch.device(device), getattr(torch, dtype)


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names of every nn.Linear but the output head (q_proj ... down_proj for Llama).

    Resolved here rather than by peft's "all-linear", which may write full module paths into adapter_config.json;
    vLLM matches adapters by these short names.
    """
    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head})


class LoraRecipe:
    def __init__(self, config: FinetuneConfig, prepared_dir: Path, out_dir: Path, *, on_event: EventSink | None,
                 home: HomeSettings, progress: bool) -> None:
        self.cfg = config
        self.t = config.training
        self.prepared_dir = prepared_dir
        self.out = out_dir
        self.home = home
        self.show_progress = progress
        self._on_event = on_event
        self.ckpt_root = out_dir / "checkpoints"
        self.log = MetricsLog(out_dir / "metrics.jsonl")
        self.state = TrainerState()
        self.last_eval: dict[str, Any] | None = None

    def emit(self, kind: str, message: str, **data: Any) -> None:
        if self._on_event is not None:
            self._on_event(kind, message, data)

    # -- setup -------------------------------------------------------------------------------------------------

    def setup(self, *, resume: bool) -> None:
        torch.set_num_threads(self.t.threads or len(os.sched_getaffinity(0)))
        torch.manual_seed(self.t.seed)
        self.device, self.dtype = pick_device_dtype(self.cfg)
        model_dir = self.home.models_dir / self.cfg.model
        if not (model_dir / MODEL_MANIFEST).is_file():
            raise FinetuneError(f"no model named {self.cfg.model!r} in the store at {self.home.models_dir}; import it "
                                "with `sovereign models import`", code="model_not_found")
        self.model_dir = model_dir
        self.base_manifest = ModelManifest.read(model_dir / MODEL_MANIFEST)
        self.encoder = ChatEncoder.from_model_dir(model_dir)
        self.train_set, train_dropped = self._encode(self.prepared_dir / "train.jsonl")
        self.val_set, val_dropped = self._encode(self.prepared_dir / "val.jsonl")
        self.val_set = self.val_set[: self.t.eval_max_conversations]
        if not self.train_set:
            raise FinetuneError(f"{self.prepared_dir / 'train.jsonl'}: no conversation is trainable "
                                f"({train_dropped})", code="no_training_data")
        if not self.val_set:
            raise FinetuneError(f"{self.prepared_dir / 'val.jsonl'}: no validation conversation is usable "
                                f"({val_dropped}); early stopping and the best checkpoint need one",
                                code="no_validation_data")
        self.emit("data", f"{len(self.train_set)} training and {len(self.val_set)} validation conversations",
                  train=len(self.train_set), val=len(self.val_set), dropped_train=train_dropped,
                  dropped_val=val_dropped, train_tokens=sum(len(e) for e in self.train_set))
        for what, dropped in (("training", train_dropped), ("validation", val_dropped)):
            if dropped:
                self.emit("warning", f"left out {sum(dropped.values())} {what} conversations: {dropped}")

        self.model = self._load_model()
        self.packing = self.t.packing
        if self.packing and not packing_is_isolated(self.model, vocab_size=self.model.config.vocab_size,
                                                    device=self.device):
            # Documented fallback: an architecture whose attention ignores position-id resets gets padded rows.
            self.packing = False
            self.emit("warning", f"{self.base_manifest.architecture}: packed conversations would attend across "
                                 "boundaries; training one conversation per row instead")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.t.learning_rate, weight_decay=self.t.weight_decay)
        lengths = [len(e) for e in self.train_set]
        self.plan = plan_training(lengths, epochs=self.t.epochs, seed=self.t.seed, max_seq_len=self.t.max_seq_len,
                                  micro_batch_tokens=self.t.micro_batch_tokens,
                                  accumulation=self.t.gradient_accumulation_steps, packing=self.packing,
                                  max_steps=self.t.max_steps, batch_size=self.t.batch_size)
        self.val_plan = [mb for step in plan_epoch([len(e) for e in self.val_set], epoch=0, seed=0,
                                                   max_seq_len=self.t.max_seq_len,
                                                   micro_batch_tokens=self.t.micro_batch_tokens, accumulation=1,
                                                   packing=self.packing, shuffle=False) for mb in step]
        from transformers import get_scheduler

        total = len(self.plan)
        self.scheduler = get_scheduler(self.t.lr_scheduler, self.optimizer,
                                       num_warmup_steps=math.ceil(self.t.warmup_ratio * total),
                                       num_training_steps=total)
        self.fingerprint = self._fingerprint()
        self.state = TrainerState(fingerprint=self.fingerprint)
        self.out.mkdir(parents=True, exist_ok=True)
        if resume and list_checkpoints(self.ckpt_root):
            self._resume()
        else:
            self._fresh_start()
        n_trainable = sum(p.numel() for p in self.params)
        self.emit("setup", f"LoRA r={self.cfg.lora.r} on {self.cfg.model}: {n_trainable:,} trainable parameters, "
                           f"{total} steps on {self.device.type} ({str(self.dtype).removeprefix('torch.')}, "
                           f"{torch.get_num_threads()} threads), packing {'on' if self.packing else 'off'}",
                  total_steps=total, trainable_parameters=n_trainable, start_step=self.state.step,
                  packing=self.packing, device=self.device.type)

    def _encode(self, path: Path) -> tuple[list[Example], dict[str, int]]:
        examples: list[Example] = []
        dropped: dict[str, int] = {}
        for messages in read_conversations(path):
            try:
                examples.append(Example.from_encoded(self.encoder.encode(messages, max_len=self.t.max_seq_len)))
            except FinetuneError as exc:  # prepare reports these by line; here they are only counted
                dropped[exc.code] = dropped.get(exc.code, 0) + 1
        return examples, dropped

    def _load_model(self) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=self.dtype, local_files_only=True,
                                                     attn_implementation=PACKED_ATTENTION)
        model.config.use_cache = False
        lora = self.cfg.lora
        targets = linear_module_names(model) if lora.target_modules == "all-linear" else lora.target_modules
        peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=targets, use_dora=False, bias="none", task_type="CAUSAL_LM")
        torch.manual_seed(self.t.seed)  # LoRA A's init
        model = get_peft_model(model, peft_config)
        if self.device.type == "cpu":
            use_fast_lora_dropout(model)
        return model.to(self.device)

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        for name in ("train.jsonl", "val.jsonl"):
            h.update((self.prepared_dir / name).read_bytes())
        h.update(settings_fingerprint(self.cfg).encode())
        h.update(json.dumps([f.sha256 for f in self.base_manifest.files]).encode())
        return h.hexdigest()

    def _fresh_start(self) -> None:
        shutil.rmtree(self.ckpt_root, ignore_errors=True)
        shutil.rmtree(self.out / "best", ignore_errors=True)
        self.log.reset()

    def _resume(self) -> None:
        step = list_checkpoints(self.ckpt_root)[-1]
        folder = self.ckpt_root / str(step)
        saved = load_trainer_state(folder)
        if saved.fingerprint != self.fingerprint:
            raise FinetuneError(f"{folder} was written for different data or settings; resume=False (or a new "
                                "output folder) starts over", code="resume_mismatch")
        self.state = load_checkpoint(folder, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        self.log.truncate_after(self.state.step)
        evals = [r for r in self.log.records() if r.get("type") == "eval"]
        self.last_eval = evals[-1] if evals else None
        self.emit("message", f"resumed from checkpoint {step}", step=step)

    # -- train -------------------------------------------------------------------------------------------------

    def forward_loss_sum(self, batch: Batch) -> torch.Tensor:
        return packed_loss_sum(self.model, batch)

    def accumulate(self, step: list) -> tuple[float, int, int]:
        """Forward and backward over every micro batch of one optimizer step; returns (loss, targets, tokens).

        Each micro batch's summed loss is divided by the trainable tokens of the whole step, so the accumulated
        gradient is that of one big batch: every assistant token weighs the same, whatever micro batch it is in.
        """
        batches = [collate(mb, self.train_set, self.encoder.pad_token_id) for mb in step]
        n_targets = sum(b.n_targets for b in batches)
        self.model.train()
        total = 0.0
        for b in batches:
            loss_sum = self.forward_loss_sum(b.to(self.device))
            (loss_sum / n_targets).backward()
            total += loss_sum.item()
        return total / n_targets, n_targets, sum(b.n_tokens for b in batches)

    def train_step(self, step: list) -> dict[str, Any]:
        loss, n_targets, n_tokens = self.accumulate(step)
        grad_norm = None
        if self.t.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.t.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens, "trainable_tokens": n_targets,
                "conversations": sum(len(row) for mb in step for row in mb)}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Validation cross-entropy per assistant token over the whole validation set."""
        self.model.eval()
        total, count = 0.0, 0
        for mb in self.val_plan:
            b = collate(mb, self.val_set, self.encoder.pad_token_id)
            total += self.forward_loss_sum(b.to(self.device)).item()
            count += b.n_targets
        self.model.train()
        return total / count

    def _eval_and_track(self) -> bool:
        """Evaluate, update the best adapter and the early-stopping counter; True means stop."""
        s = self.state
        val = self.evaluate()
        improved = s.best_val_loss is None or val < s.best_val_loss - self.t.early_stopping_min_delta
        if improved:
            s.best_val_loss, s.best_step, s.evals_without_improvement = val, s.step, 0
            self._save_best()
        else:
            s.evals_without_improvement += 1
        record = {"type": "eval", "step": s.step, "val_loss": val, "val_perplexity": math.exp(min(val, 50)),
                  "best_val_loss": s.best_val_loss, "best_step": s.best_step}
        self.log.append(record)
        self.last_eval = record
        self.emit("eval", f"Step {s.step}: validation loss={val:.4f}" + (" (best)" if improved else ""), **record)
        patience = self.t.early_stopping_patience
        if patience is not None and s.evals_without_improvement >= patience:
            s.stopped_early = True
            self.emit("early_stop", f"validation loss has not improved for {patience} evaluations; stopping at "
                                    f"step {s.step}, keeping step {s.best_step}", step=s.step, best_step=s.best_step)
            return True
        return False

    def _save_best(self) -> None:
        tmp = self.out / ".best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp / ADAPTER)
        (tmp / ADAPTER / "README.md").unlink(missing_ok=True)
        write_json_atomic(tmp / "best.json", {"step": self.state.step, "val_loss": self.state.best_val_loss})
        _swap_in(tmp, self.out / "best")

    def _checkpoint(self, last_train: dict[str, Any] | None) -> None:
        s = self.state
        metrics = {"step": s.step, "train_loss": last_train["loss"] if last_train else None,
                   "valid_loss": self.last_eval["val_loss"] if self.last_eval else None,
                   "valid_loss_step": self.last_eval["step"] if self.last_eval else None,
                   "trained_tokens": s.trained_tokens, "lr": last_train["lr"] if last_train else None}
        folder = save_checkpoint(self.ckpt_root, model=self.model, optimizer=self.optimizer,
                                 scheduler=self.scheduler, state=s, metrics=metrics, keep=self.t.keep_checkpoints)
        self.emit("checkpoint", f"checkpoint at step {s.step}", path=str(folder), **metrics)

    def train(self) -> None:
        s, total = self.state, len(self.plan)
        if s.step == 0 and self.last_eval is None:
            # Step 0 = the base model (LoRA B starts at zero): the figure the adapter has to beat.
            self._eval_and_track()
        if s.stopped_early:
            return
        bar = _Progress(total, enabled=self.show_progress, start=s.step)
        started, tokens_since = time.perf_counter(), 0
        last_train: dict[str, Any] | None = None
        try:
            while s.step < total:
                epoch, step = self.plan[s.step]
                t0 = time.perf_counter()
                m = self.train_step(step)
                s.step += 1
                s.trained_tokens += m["tokens"]
                s.trained_targets += m["trainable_tokens"]
                tokens_since += m["tokens"]
                elapsed = time.perf_counter() - started
                last_train = {"type": "train", "step": s.step, "epoch": epoch, **m,
                              "step_time_s": time.perf_counter() - t0, "tokens_per_s": tokens_since / elapsed}
                self.log.append(last_train)
                self.emit("metrics", f"Step {s.step}/{total}: training loss={m['loss']:.4f}", **last_train)
                bar.update(s.step, m["loss"], last_train["tokens_per_s"], self.last_eval)
                stop = False
                if s.step % self.t.eval_every_steps == 0 or s.step == total:
                    stop = self._eval_and_track()
                if stop or s.step % self.t.checkpoint_every_steps == 0 or s.step == total:
                    self._checkpoint(last_train)
                if stop:
                    break
        finally:
            bar.close()

    # -- save --------------------------------------------------------------------------------------------------

    def save(self) -> TrainResult:
        """The best evaluation's adapter to out/adapter, the loss curve, and a summary."""
        s = self.state
        adapter_dir = self.out / "adapter"
        tmp = self.out / ".adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.out / "best" / ADAPTER, tmp)
        _swap_in(tmp, adapter_dir)
        records = self.log.records()
        plot_loss_curve(records, self.out / "loss_curve.png", title=f"{self.cfg.name} on {self.cfg.model}")
        evals = [r for r in records if r["type"] == "eval"]
        trains = [r for r in records if r["type"] == "train"]
        metrics = {
            "base_val_loss": evals[0]["val_loss"] if evals and evals[0]["step"] == 0 else None,
            "best_val_loss": s.best_val_loss,
            "best_val_perplexity": math.exp(min(s.best_val_loss, 50)) if s.best_val_loss is not None else None,
            "best_step": s.best_step,
            "final_train_loss": trains[-1]["loss"] if trains else None,
            "steps": s.step,
            "total_steps": len(self.plan),
            "stopped_early": s.stopped_early,
            "trained_tokens": s.trained_tokens,
            "trained_assistant_tokens": s.trained_targets,
            "tokens_per_s": trains[-1]["tokens_per_s"] if trains else None,
            "packing": self.packing,
            "train_conversations": len(self.train_set),
            "val_conversations": len(self.val_set),
            "pad_token_id": self.encoder.pad_token_id,
            "end_of_turn_token": self.encoder.end_of_turn,
        }
        write_json_atomic(self.out / "train_result.json", {"adapter_dir": str(adapter_dir), **metrics,
                                                            "trainer_state": asdict(s)})
        self.emit("done", f"adapter from step {s.best_step} (validation loss {s.best_val_loss:.4f}) in "
                          f"{adapter_dir}", adapter_dir=str(adapter_dir), **metrics)
        return TrainResult(adapter_dir=adapter_dir, best_step=s.best_step, metrics=metrics,
                           trained_tokens=s.trained_tokens)


def _swap_in(new: Path, final: Path) -> None:
    """Replace folder `final` by `new` so that a kill at any moment leaves one of the two complete."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    new.rename(final)
    shutil.rmtree(old, ignore_errors=True)


class _Progress:
    """A rich progress bar on stderr (or nothing, when not a terminal or not wanted)."""

    def __init__(self, total: int, *, enabled: bool, start: int) -> None:
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[info]}"), console=Console(stderr=True))
        self.bar.start()
        self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, loss: float, tps: float, last_eval: dict[str, Any] | None) -> None:
        if self.bar is None:
            return
        info = f"loss {loss:.3f}  {tps:,.0f} tok/s"
        if last_eval:
            info += f"  val {last_eval['val_loss']:.3f}@{last_eval['step']}"
        self.bar.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
