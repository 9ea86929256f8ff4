"""FinetuneConfig: one YAML in configs/finetune/ says which model, which data, which LoRA and how to train.

Env overrides use the prefix SOVEREIGN_FINETUNE_ with `__` between levels, e.g.
SOVEREIGN_FINETUNE_TRAINING__MAX_STEPS=20. The defaults produce an adapter vLLM can serve: LoRA on every linear
layer of the decoder, rank within the serving profile's `max_lora_rank`, no DoRA, no `modules_to_save` (vLLM
rejects or silently ignores both). An invalid file fails at load time naming the file and the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from sovereign.settings import YamlSettings, config_path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# vLLM accepts only these LoRA ranks (vllm/config/lora.py); kept equal to serving.profile.VLLM_LORA_RANKS.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The served name is "name@version": the name must survive URLs, file names and vLLM's LoRA registry.
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # always fullmatch: `$` would let a trailing "\n" in


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSettings(_Section):
    """Where the conversations come from and how `sovereign finetune prepare` turns them into train/val JSONL."""

    train_file: Path | None = None  # raw export: OpenAI chat JSONL (canonical), ShareGPT, Alpaca or CSV
    validation_file: Path | None = None  # optional; otherwise split off train_file
    prepared_dir: Path | None = None  # output of `prepare` (train.jsonl, val.jsonl, prepare_report.json)
    format: Literal["auto", "openai", "sharegpt", "alpaca", "csv"] = "auto"
    columns: dict[str, str] = Field(default_factory=dict)  # CSV column mapping, e.g. {"user": "question", ...}
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    scrub_pii: bool = True
    # Refuse the data, naming the lines, where it holds personal data, instead of scrubbing it: what a gateway job of
    # a team whose policy is pii=block gets.
    refuse_pii: bool = False
    dedup: bool = True
    # 0.85 on 5-character shingles: a one-character edit of a two-exchange chat is still caught (measured on the
    # generated sample set); two different chats from the same template stay apart.
    near_duplicate_threshold: float = Field(0.85, gt=0, le=1)
    on_invalid: Literal["fail", "drop"] = "fail"  # fail: refuse the file on any problem; drop: leave bad rows out
    seed: int = 0


class LoraSettings(_Section):
    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    # "all-linear": every nn.Linear of the decoder except the output head, found from the architecture at train time.
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    use_dora: bool = False
    modules_to_save: list[str] | None = None

    @field_validator("r")
    @classmethod
    def _rank_vllm_accepts(cls, v: int) -> int:
        if v not in VLLM_LORA_RANKS:
            raise ValueError(f"must be one of {VLLM_LORA_RANKS} (the LoRA ranks vLLM serves)")
        return v

    @field_validator("use_dora")
    @classmethod
    def _no_dora(cls, v: bool) -> bool:
        if v:
            raise ValueError("DoRA adapters are not served by vLLM; set use_dora: false")
        return v

    @field_validator("modules_to_save")
    @classmethod
    def _no_modules_to_save(cls, v: list[str] | None) -> list[str] | None:
        if v:
            raise ValueError("vLLM ignores or rejects modules_to_save (fully trained layers); leave it empty")
        return None

    @field_validator("target_modules")
    @classmethod
    def _no_head(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("name at least one module, or use 'all-linear'")
            bad = [m for m in v if m in ("lm_head", "embed_tokens")]
            if bad:
                raise ValueError(f"{bad} would need modules_to_save or embedding LoRA, which vLLM does not serve")
        return v


class TrainingSettings(_Section):
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; stops before `epochs` when reached
    # A micro batch is packed rows of up to `max_seq_len` tokens, at most `micro_batch_tokens` tokens in all.
    micro_batch_tokens: int = Field(4096, ge=16)
    gradient_accumulation_steps: int = Field(4, ge=1)
    # Conversations per optimizer step (OpenAI's `batch_size`), each step packed into micro batches of its own; None:
    # a step is `gradient_accumulation_steps` micro batches, however many conversations they hold.
    batch_size: int | None = Field(None, ge=1)
    max_seq_len: int = Field(1024, ge=16)  # a longer conversation is left out of training (reported)
    packing: bool = True
    seed: int = 42
    eval_every_steps: int = Field(50, ge=1)
    # Evaluate during training on the first N validation conversations only (None = all): the full set is scored
    # once more after training by the evaluation stage; this keeps frequent evaluations cheap on CPU.
    eval_max_conversations: int | None = Field(None, ge=1)
    checkpoint_every_steps: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)  # newest N kept; the best one is always kept as well
    early_stopping_patience: int | None = Field(3, ge=1)  # evaluations without improvement; None = never stop early
    early_stopping_min_delta: float = Field(0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "auto": bfloat16 on CUDA; float32 on CPU (AVX2 has no bf16: measured 5x slower in vLLM's CPU build).
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    threads: int | None = Field(None, ge=1)  # torch CPU threads; None = every core this process may use

    @model_validator(mode="after")
    def _batch_fits(self) -> "TrainingSettings":
        if self.micro_batch_tokens < self.max_seq_len:
            raise ValueError(f"micro_batch_tokens ({self.micro_batch_tokens}) must be at least max_seq_len "
                             f"({self.max_seq_len}): one full row must fit in a micro batch")
        return self


class FinetuneConfig(YamlSettings):
    """A fine-tune run: base model from the store, data, LoRA and training settings, and the adapter's name."""

    model_config = SettingsConfigDict(env_prefix="SOVEREIGN_FINETUNE_", extra="forbid", env_nested_delimiter="__")

    name: str  # the adapter's name; published as "name@version"
    model: str = DEFAULT_MODEL  # a model in the store: <SOVEREIGN_HOME>/models/<model>
    serving_profile: str = "cpu"  # configs/serving/<profile>.yaml: its max_lora_rank bounds lora.r
    description: str | None = None
    data: DataSettings = Field(default_factory=DataSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME_RE.fullmatch(v):
            raise ValueError("use 1-64 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v

    @model_validator(mode="after")
    def _rank_within_serving_profile(self) -> "FinetuneConfig":
        limit = serving_max_lora_rank(self.serving_profile)
        if limit is not None and self.lora.r > limit:
            raise ValueError(f"lora.r = {self.lora.r} exceeds max_lora_rank = {limit} of the serving profile "
                             f"{self.serving_profile!r}; vLLM would refuse the adapter")
        return self

    @classmethod
    def named(cls, name_or_path: str | Path, **overrides: Any) -> "FinetuneConfig":
        """Load `customer-service` from configs/finetune/, or a YAML path."""
        return cls.load(config_path("finetune", name_or_path), **overrides)


def serving_max_lora_rank(profile: str) -> int | None:
    """The serving profile's max_lora_rank (read from its YAML), or None when the profile file is not there."""
    import yaml

    path = config_path("serving", profile)
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return int(data.get("max_lora_rank", 16))
