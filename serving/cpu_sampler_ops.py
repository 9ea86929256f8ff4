"""The sampler's token-rank count for logprobs, run eagerly on the CPU backend instead of through torch.compile (a
vLLM general plugin, entry point `vllm.general_plugins`; it changes nothing off the CPU platform).

Why: vLLM wraps `batched_count_greater_than` (how many vocabulary entries score at least the chosen token's, the
`rank` of each returned logprob) in `torch.compile` with inductor on every platform, `--enforce-eager` or not. On
CPU inductor writes and compiles C++ for it, inside the first request that asks for logprobs: that request took
17-19 s after a fresh start on this 2-core box (3.2 s with inductor's cache warm) against 0.2 s for the next (0.23 s
for the first with this plugin). The compiled kernel's point is to spare GPU memory a boolean copy of the batch's
logprobs; on CPU that copy is 49,152 bytes a sequence for the default model's vocabulary, so the plain expression
costs nothing worth compiling.
"""

from __future__ import annotations

import torch


def batched_count_greater_than(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """For each row of `x` (batch, vocab), how many entries are >= that row's value in `values` (batch, 1)."""
    return (x >= values).sum(-1)


def register() -> None:
    """The plugin's entry point: replace the compiled count where vLLM's sampler calls it (idempotent, CPU only)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.sample import sampler
    from vllm.v1.sample.ops import logprobs

    # sampler.py imported the function by name; later importers read it from logprobs.py.
    sampler.batched_count_greater_than = batched_count_greater_than
    logprobs.batched_count_greater_than = batched_count_greater_than
