"""Float16 weights for vLLM's float32 linear layers on the CPU backend, computed with PyTorch's fbgemm kernels
(`quantized.linear_dynamic_fp16`: float16 weights, float32 activations and accumulation). A vLLM general plugin
(entry point `vllm.general_plugins`), chosen by the serving profile (`cpu_linear_weights: float16`); it changes
nothing off the CPU platform or for weights that are not float32.

Why: a decode step reads every weight once, so at low concurrency the step time is the bytes read (the default
model's linears and lm_head are 539 MB in float32). AVX2 has no bf16 arithmetic, but it converts float16 to float32
in one instruction (F16C), so fbgemm's kernels read half the bytes at float32 speed. Measured here on one decode
step's linears of the default model (30 layers + lm_head, one thread): 40.5 ms with vLLM's oneDNN float32 against
23.7 ms at 1 token, 98 against 72 ms at 16, 297 against 234 ms at 64; two threads 23.3 / 56.4 / 161 against
16.2 / 41.9 / 141 ms. The weights lose precision below what the default model's GGUF already dropped (its Q4_1
blocks keep ~4 bits a weight; float16 keeps 11): outputs move by ~2e-4 relative.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch

from serving.profile import LINEAR_WEIGHTS_ENV

log = logging.getLogger("vllm.sovereign.cpu_linear_ops")

_MARK = "__sovereign_wrapped__"


def fp16_linear(weight: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """`cpu_linear(x, weight, bias)` for vLLM, computing x @ weight.T with `weight` packed once as float16."""
    packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().contiguous(), None)
    out_features = weight.shape[0]

    def linear(x: torch.Tensor, _weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, x.shape[-1]).contiguous(), packed)
        if bias is not None:
            y += bias
        return y.reshape(*lead, out_features)

    return linear


def _applies(layer: torch.nn.Module) -> bool:
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    weight = getattr(layer, "weight", None)
    if weight is None or weight.is_meta or weight.dim() != 2 or weight.dtype != torch.float32:
        return False
    # An input embedding only looks rows up; packing it would cost memory for a product nobody computes.
    return not isinstance(layer, VocabParallelEmbedding) or isinstance(layer, ParallelLMHead)


def _with_fp16_weights(dispatch: Callable) -> Callable:
    @functools.wraps(dispatch)
    def wrapped(layer: torch.nn.Module, remove_weight: bool) -> None:
        if not _applies(layer):
            return dispatch(layer, remove_weight)
        layer.cpu_linear = fp16_linear(layer.weight)
        if remove_weight:  # as vLLM's own dispatch does: the packed copy is all the layer needs
            layer.weight = torch.nn.Parameter(torch.empty(0, dtype=layer.weight.dtype), requires_grad=False)
        _log_once()
        return None

    setattr(wrapped, _MARK, True)
    return wrapped


@functools.cache
def _log_once() -> None:
    log.info("sovereign: float32 linear layers run with float16 weights (fbgemm) on vLLM's CPU backend")


def register() -> None:
    """The plugin's entry point: wrap vLLM's CPU GEMM dispatch when the profile asks for float16 weights
    (idempotent, CPU platform only). The choice arrives as an environment variable: plugins run inside vLLM."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or os.environ.get(LINEAR_WEIGHTS_ENV, "float32") != "float16":
        return
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        log.warning("sovereign: this torch has no fbgemm float16 linear; linear layers keep float32 weights")
        return
    from vllm.model_executor.layers import utils

    # linear.py and vocab_parallel_embedding.py import the function from this module when weights are processed.
    if not hasattr(utils.dispatch_cpu_unquantized_gemm, _MARK):
        utils.dispatch_cpu_unquantized_gemm = _with_fp16_weights(utils.dispatch_cpu_unquantized_gemm)
