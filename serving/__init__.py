"""Serving: runs open-source models on vLLM.

Owns the offline model store (every weight hashed, `sovereign models …`), serving profiles (typed YAML → vLLM
arguments), the supervisor that launches and watches vLLM's own OpenAI server (`sovereign serve`), and the LoRA
adapter registry, whose adapters it hot-loads onto running replicas (`sovereign adapters …`).
It never re-implements vLLM's server; it starts `python -m vllm.entrypoints.openai.api_server`. Three vLLM plugins
(`cpu_lora_ops`, `cpu_norm_ops`, `cpu_linear_ops`) fix and speed up vLLM's CPU backend from inside its own processes.
"""
