"""Checkpoints that resume exactly: adapter, optimizer, scheduler, every RNG state and the data position.

Layout: `<out>/checkpoints/<step>/` holds `adapter/` (peft's adapter_config.json + adapter_model.safetensors, what
vLLM loads), `training_state.pt` (optimizer, scheduler, RNG states), `trainer_state.json` (step, best val loss,
early-stopping counter, the run's fingerprint) and `metrics.json` (what the jobs API shows for the checkpoint).
A checkpoint is built in a hidden folder and renamed into place, so a run killed while saving leaves either the
previous checkpoint or the complete new one, never half of one.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sovereign.formats import write_json_atomic

TRAINING_STATE = "training_state.pt"
TRAINER_STATE = "trainer_state.json"
METRICS = "metrics.json"
ADAPTER = "adapter"


@dataclass
class TrainerState:
    """What the loop needs besides tensors to go on where it stopped."""

    step: int = 0  # optimizer steps done; the next step to run is plan[step]
    fingerprint: str = ""  # hash of data + config: a resume against different inputs is refused
    best_val_loss: float | None = None
    best_step: int = 0
    evals_without_improvement: int = 0
    trained_tokens: int = 0
    trained_targets: int = 0
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(root: Path, *, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: TrainerState, metrics: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `state.step` atomically, then prune old ones (the newest `keep` and the best survive)."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / str(state.step)
    tmp = root / f".tmp-{state.step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp / ADAPTER)
    (tmp / ADAPTER / "README.md").unlink(missing_ok=True)  # peft's model-card stub says nothing about this run
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states()},
               tmp / TRAINING_STATE)
    write_json_atomic(tmp / TRAINER_STATE, asdict(state))
    write_json_atomic(tmp / METRICS, metrics)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    prune(root, keep=keep, protect={state.best_step})
    return final


def list_checkpoints(root: Path) -> list[int]:
    """Complete checkpoints (those with a trainer state), oldest first."""
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / TRAINER_STATE).is_file())


def prune(root: Path, *, keep: int, protect: set[int]) -> None:
    steps = list_checkpoints(root)
    for step in steps[:-keep] if keep else steps:
        if step not in protect:
            shutil.rmtree(root / str(step), ignore_errors=True)
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def load_trainer_state(folder: Path) -> TrainerState:
    return TrainerState(**json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8")))


def load_checkpoint(folder: Path, *, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainerState:
    """Restore adapter weights, optimizer, scheduler and RNG states from `folder`; return the trainer state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(folder / ADAPTER / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"{folder}: adapter weights do not fit this model (unexpected: {unexpected[:3]})")
    blob = torch.load(folder / TRAINING_STATE, weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_states(blob["rng"])
    return load_trainer_state(folder)
