"""The environment every process the platform starts gets: nothing may reach the internet at run time."""

from __future__ import annotations

import os
from collections.abc import Mapping

OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "WANDB_MODE": "disabled",
}

# Variables that would send traffic somewhere or pull credentials into a child; a hardened child never inherits them.
_DROPPED_PREFIXES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy", "HF_TOKEN",
                     "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "OPENAI_API_KEY")


def offline_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """A copy of `base` (default: this process's environment) with the offline variables forced on."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(_DROPPED_PREFIXES)}
    env.update(OFFLINE_ENV)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost,::1"
    env.update(extra)
    return env


def apply_offline_env() -> None:
    """Force the offline variables on in this process (call before importing transformers/huggingface_hub)."""
    os.environ.update(OFFLINE_ENV)
