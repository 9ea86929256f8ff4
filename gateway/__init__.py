"""Gateway: the only door. An OpenAI-compatible API that authenticates keys, applies per-team policy, enforces
quotas, writes a hash-chained audit trail, routes to vLLM replicas and exports Prometheus metrics.

Imports no torch, transformers or vllm: it starts in well under a second and ships as a small image.
"""
