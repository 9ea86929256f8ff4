"""Serving profiles: typed YAML (configs/serving/*.yaml) turned into vLLM's command line and environment.

Env overrides use the prefix SOVEREIGN_SERVING_ (e.g. SOVEREIGN_SERVING_MAX_NUM_SEQS=32). An invalid profile is
refused here, naming the file and the field, before vLLM is started.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from sovereign.settings import YamlSettings, config_path

LORA_OPS_ENV = "SOVEREIGN_CPU_LORA_OPS"  # read by serving/cpu_lora_ops.py inside vLLM's processes
LINEAR_WEIGHTS_ENV = "SOVEREIGN_CPU_LINEAR_WEIGHTS"  # read by serving/cpu_linear_ops.py inside vLLM's processes
INT4_WEIGHTS_ENV = "SOVEREIGN_CPU_INT4_WEIGHTS"  # likewise
NORM_PROVIDER = "sovereign_cpu"  # the IR-op provider serving/cpu_norm_ops.py registers

# vLLM accepts only these LoRA ranks (vllm/config/lora.py).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# The flags vllm_args renders (with vLLM's aliases) -> where to set them instead. extra_args may not repeat them:
# vLLM takes the last value, so the supervisor would check adapters against one limit while vLLM used another.
_SET_BY = ""  # fixed by the profile, no field to change it
_OWNED_FLAGS = {
    "--model": "the model store (`sovereign serve --model`)",
    "--served-model-name": "`sovereign serve --served-name`",
    "--host": "host", "--port": "port", "--dtype": "dtype", "--max-num-seqs": "max_num_seqs",
    "--tensor-parallel-size": "tensor_parallel_size", "-tp": "tensor_parallel_size",
    "--pipeline-parallel-size": "pipeline_parallel_size", "-pp": "pipeline_parallel_size",
    "--disable-uvicorn-access-log": _SET_BY, "--no-disable-uvicorn-access-log": _SET_BY,
    "--generation-config": _SET_BY,
    "--enforce-eager": "enforce_eager", "--no-enforce-eager": "enforce_eager",
    "--max-model-len": "max_model_len", "--max-num-batched-tokens": "max_num_batched_tokens",
    "--enable-prefix-caching": "enable_prefix_caching", "--no-enable-prefix-caching": "enable_prefix_caching",
    "--enable-chunked-prefill": "enable_chunked_prefill", "--no-enable-chunked-prefill": "enable_chunked_prefill",
    "--stream-interval": "stream_interval",
    "--gpu-memory-utilization": "gpu_memory_utilization", "--device-memory-utilization": "gpu_memory_utilization",
    "--kernel-config": "cpu_rms_norm",
    "--enable-lora": "enable_lora", "--no-enable-lora": "enable_lora",
    "--enable-auto-tool-choice": "tool_call_parser", "--no-enable-auto-tool-choice": "tool_call_parser",
    "--tool-call-parser": "tool_call_parser", "--reasoning-parser": "reasoning_parser",
    "--max-loras": "max_loras", "--max-lora-rank": "max_lora_rank", "--max-cpu-loras": "max_cpu_loras",
}


class ServingProfile(YamlSettings):
    model_config = SettingsConfigDict(env_prefix="SOVEREIGN_SERVING_", extra="forbid", env_nested_delimiter="__")

    name: str = "custom"
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    enforce_eager: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    health_port: int = Field(8001, ge=1, le=65535)

    max_model_len: int | None = Field(None, ge=128)
    max_num_seqs: int = Field(32, ge=1, le=4096)
    max_num_batched_tokens: int | None = Field(None, ge=256)
    enable_prefix_caching: bool = False
    enable_chunked_prefill: bool | None = None  # None: vLLM's default for the platform
    # Tokens per streamed chunk: >1 trades a little streaming smoothness for less detokenize/SSE work per token.
    stream_interval: int = Field(1, ge=1, le=64)
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)

    # CPU backend: KV cache lives in host memory (VLLM_CPU_KVCACHE_SPACE, GiB); threads are bound to cores.
    kv_cache_gib: float | None = Field(None, gt=0, le=1024)
    cpu_threads_bind: str | None = None  # VLLM_CPU_OMP_THREADS_BIND: "auto", "0-1", "nobind"
    # VLLM_CPU_NUM_OF_RESERVED_CPU: cores kept free of the model's OpenMP threads for the API server and scheduler
    # (vLLM's auto binding reserves one per rank, i.e. half of a 2-core machine).
    cpu_reserved_cpus: int | None = Field(None, ge=0)
    # GPU backend
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)

    enable_lora: bool = True
    max_loras: int = Field(4, ge=1, le=256)
    max_lora_rank: int = 16
    max_cpu_loras: int | None = Field(None, ge=1)
    # CPU backend: "grouped" runs multi-LoRA with our plugin's ops (serving/cpu_lora_ops.py), "vllm" with vLLM's own.
    cpu_lora_ops: Literal["grouped", "vllm"] = "grouped"
    # CPU backend: "kernel" runs RMSNorm with vLLM's C++ CPU kernels (serving/cpu_norm_ops.py), "native" as torch ops.
    cpu_rms_norm: Literal["kernel", "native"] = "kernel"
    # CPU backend, float32 models: "float16" keeps the linear layers' weights as float16 and computes with PyTorch's
    # fbgemm kernels (serving/cpu_linear_ops.py: half the bytes read per step), "float32" leaves them to vLLM.
    cpu_linear_weights: Literal["float16", "float32"] = "float16"
    # CPU backend: "exact" keeps the weights of layers that hold exact 4-bit groups of 32 (a Q4_1 GGUF import, as the
    # embedded default's linear layers are) as int4 for batches of a few tokens (serving/cpu_linear_ops.py), on CPUs
    # with AVX512-BF16; nothing changes for other layers or CPUs. "off" leaves every layer to the float path.
    cpu_int4_weights: Literal["exact", "off"] = "off"

    # Tool calling: vLLM's parser for the served model's tool-call format (hermes, llama3_json, mistral, qwen3_xml,
    # ...). Set, `tool_choice: "auto"` and a named tool work (vLLM's --enable-auto-tool-choice); unset, vLLM 0.32
    # refuses both with a 400 saying the parser is needed. An unknown name stops vLLM at start with its list of
    # parsers, which health and `up` show.
    tool_call_parser: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    # Reasoning models: vLLM's parser that moves the thinking out of `content` (deepseek_r1, qwen3, ...).
    reasoning_parser: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")

    extra_args: list[str] = Field(default_factory=list)
    extra_env: dict[str, str] = Field(default_factory=dict)  # further vLLM/OpenMP variables, applied last

    ready_timeout_s: float = Field(600, gt=0)
    restart_backoff_s: float = Field(2, gt=0)
    restart_backoff_max_s: float = Field(60, gt=0)
    adapter_poll_s: float = Field(1.0, gt=0)

    @field_validator("max_lora_rank")
    @classmethod
    def _rank_vllm_accepts(cls, v: int) -> int:
        if v not in VLLM_LORA_RANKS:
            raise ValueError(f"must be one of {VLLM_LORA_RANKS} (vLLM's supported LoRA ranks)")
        return v

    @field_validator("extra_args")
    @classmethod
    def _no_flag_the_profile_owns(cls, v: list[str], info: ValidationInfo) -> list[str]:
        for arg in v:
            flag = _owned_flag(arg)
            if flag == "--kernel-config" and info.data.get("device") != "cpu":
                continue  # rendered on cpu only
            if flag:
                where = _OWNED_FLAGS[flag]
                raise ValueError(f"{arg!r} sets vLLM's {flag}, which the profile renders itself; "
                                 + (f"set it with {where} instead" if where else "the profile fixes its value"))
        return v

    @model_validator(mode="after")
    def _device_consistency(self) -> "ServingProfile":
        if self.device == "cpu" and self.gpu_memory_utilization is not None:
            raise ValueError("gpu_memory_utilization applies to device: cuda only")
        if self.device == "cuda" and self.kv_cache_gib is not None:
            raise ValueError("kv_cache_gib applies to device: cpu only (use gpu_memory_utilization on cuda)")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError("max_cpu_loras must be >= max_loras")
        if self.port == self.health_port:
            raise ValueError(f"port and health_port are both {self.port}: vLLM and the supervisor's health server "
                             f"need different ports")
        return self

    @classmethod
    def named(cls, name_or_path: str | Path, **overrides) -> "ServingProfile":
        """Load `cpu`/`gpu` from configs/serving/, or a YAML path."""
        return cls.load(config_path("serving", name_or_path), **overrides)

    def vllm_args(self, model_dir: Path, served_name: str) -> list[str]:
        """The command line of vLLM's OpenAI server for this profile."""
        args = [
            "--model", str(model_dir),
            "--served-model-name", served_name,
            "--host", self.host,
            "--port", str(self.port),
            "--dtype", self.dtype,
            "--max-num-seqs", str(self.max_num_seqs),
            "--tensor-parallel-size", str(self.tensor_parallel_size),
            "--pipeline-parallel-size", str(self.pipeline_parallel_size),
            "--disable-uvicorn-access-log",
            # Generation defaults come from the request, not from a generation_config.json found in the folder.
            "--generation-config", "vllm",
        ]
        if self.enforce_eager:
            args.append("--enforce-eager")
        if self.max_model_len is not None:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.max_num_batched_tokens is not None:
            args += ["--max-num-batched-tokens", str(self.max_num_batched_tokens)]
        args.append("--enable-prefix-caching" if self.enable_prefix_caching else "--no-enable-prefix-caching")
        if self.enable_chunked_prefill is not None:
            args.append("--enable-chunked-prefill" if self.enable_chunked_prefill else "--no-enable-chunked-prefill")
        if self.stream_interval != 1:
            args += ["--stream-interval", str(self.stream_interval)]
        if self.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.device == "cpu" and self.cpu_rms_norm == "kernel":
            first = [NORM_PROVIDER]  # vLLM appends its own native implementation behind it
            args += ["--kernel-config", json.dumps({"ir_op_priority": {"rms_norm": first,
                                                                       "fused_add_rms_norm": first}})]
        if self.tool_call_parser is not None:
            args += ["--enable-auto-tool-choice", "--tool-call-parser", self.tool_call_parser]
        if self.reasoning_parser is not None:
            args += ["--reasoning-parser", self.reasoning_parser]
        if self.enable_lora:
            args += ["--enable-lora", "--max-loras", str(self.max_loras), "--max-lora-rank", str(self.max_lora_rank)]
            if self.max_cpu_loras is not None:
                args += ["--max-cpu-loras", str(self.max_cpu_loras)]
        return args + list(self.extra_args)

    def vllm_env(self) -> dict[str, str]:
        """Environment variables vLLM reads for this profile (added on top of the offline environment)."""
        env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true" if self.enable_lora else "false"}
        if self.device == "cpu":
            env["VLLM_TARGET_DEVICE"] = "cpu"
            if self.kv_cache_gib is not None:
                env["VLLM_CPU_KVCACHE_SPACE"] = f"{self.kv_cache_gib:g}"
            if self.cpu_threads_bind is not None:
                env["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu_threads_bind
            if self.cpu_reserved_cpus is not None:
                env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(self.cpu_reserved_cpus)
            env[LORA_OPS_ENV] = self.cpu_lora_ops
            env[LINEAR_WEIGHTS_ENV] = self.cpu_linear_weights
            env[INT4_WEIGHTS_ENV] = self.cpu_int4_weights
        env.update(self.extra_env)
        return env


def _owned_flag(arg: str) -> str | None:
    """The profile-owned flag `arg` sets as vLLM parses it (`_` for `-`, `--flag=value`, unambiguous prefixes)."""
    if not arg.startswith("-"):
        return None
    key = arg.split("=", 1)[0]
    if key.startswith("--"):
        key = "--" + key[2:].split(".", 1)[0].replace("_", "-")  # `--kernel-config.x` sets a key of --kernel-config
    if key in _OWNED_FLAGS:
        return key
    # argparse accepts any unambiguous prefix of a long flag; no vLLM flag is a prefix of one the profile owns.
    if key.startswith("--") and len(key) > 2:
        return next((f for f in _OWNED_FLAGS if f.startswith(key)), None)
    return None


def detect_device() -> Literal["cpu", "cuda"]:
    """`cuda` when an NVIDIA device is visible, without importing torch."""
    return "cuda" if Path("/dev/nvidia0").exists() or os.environ.get("NVIDIA_VISIBLE_DEVICES") not in (None, "", "void", "none") else "cpu"
