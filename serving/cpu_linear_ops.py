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

Int4 weights where they are exact (profile `cpu_int4_weights: exact`): a layer whose every group of 32 weights
along the input holds 16 evenly spaced levels from the group's minimum to its maximum (a Q4_1 GGUF block
dequantized: the embedded default's linear layers) keeps those levels as int4, with bfloat16 scales and offsets,
and batches of up to a few tokens run PyTorch's int4 kernel on bfloat16 activations (weights read: 0.56 bytes each
instead of 2). Larger batches keep the float path. CPUs without AVX512-BF16 are left alone: PyTorch's int4 kernel
has no fast path there. Measured on one decode step's linears of the default model (30 layers + lm_head, one
thread, AVX512-BF16 + AMX host): 9.7 ms at 1 token against 24.3 with float16 weights, 15.2 against 31.7 at 4,
52.7 against 69.9 at 16; two threads 4.8 against 13.6 at 1 token.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch

from serving.profile import INT4_WEIGHTS_ENV, LINEAR_WEIGHTS_ENV

log = logging.getLogger("vllm.sovereign.cpu_linear_ops")

_MARK = "__sovereign_wrapped__"
GROUP = 32  # a Q4_1 block
# Batches up to this many tokens read the int4 copy, larger ones the float path, by which is faster (one decode
# step's linears, one thread): int4 beats float16 fbgemm up to 16 tokens, vLLM's bfloat16 oneDNN (AMX) only to ~4.
INT4_MAX_TOKENS = {torch.float32: 16, torch.bfloat16: 4}


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


def exact_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """PyTorch's int4 layout of `weight` (out, in) and its (in/32, out, 2) bfloat16 scales and offsets (the kernel
    computes (level - 8) * scale + offset), when every group of 32 along `in` is 16 evenly spaced levels from its
    minimum to its maximum (a Q4_1 block) up to the dtype's rounding; None otherwise."""
    out_f, in_f = weight.shape
    if in_f % GROUP or weight.dtype not in INT4_MAX_TOKENS:
        return None
    w = weight.detach().float().reshape(out_f, in_f // GROUP, GROUP)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    step = (high - low) / 15
    levels = torch.round((w - low) / torch.where(step > 0, step, 1)).clamp_(0, 15)
    # Rounding to the weight's dtype moved the group's ends as well as each weight: allow that much, and no more.
    slack = step * 1e-3 + torch.maximum(low.abs(), high.abs()) * 2 * torch.finfo(weight.dtype).eps
    if ((levels * step + low - w).abs() > slack).any():
        return None
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels.reshape(out_f, in_f).to(torch.int32), 1)
    scales = torch.stack([step, low + 8 * step], -1).reshape(out_f, in_f // GROUP, 2).transpose(0, 1)
    return packed, scales.to(torch.bfloat16).contiguous()


def int4_linear(weight: torch.Tensor, fallback: Callable) -> Callable | None:
    """`cpu_linear(x, weight, bias)` that reads `weight`'s exact int4 levels for batches up to INT4_MAX_TOKENS and
    calls `fallback` (the float path) for larger ones; None when `weight` is not exactly int4."""
    int4 = exact_int4(weight)
    if int4 is None:
        return None
    packed, scales = int4
    out_features, max_tokens = weight.shape[0], INT4_MAX_TOKENS[weight.dtype]
    int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu

    def linear(x: torch.Tensor, _weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] > max_tokens:
            return fallback(x, _weight, bias)
        y = int4_mm(rows.to(torch.bfloat16).contiguous(), packed, GROUP, scales).to(x.dtype)
        if bias is not None:
            y += bias
        return y.reshape(*x.shape[:-1], out_features)

    return linear


def _applies(layer: torch.nn.Module, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    weight = getattr(layer, "weight", None)
    if weight is None or weight.is_meta or weight.dim() != 2 or weight.dtype not in dtypes:
        return False
    # An input embedding only looks rows up; packing it would cost memory for a product nobody computes.
    return not isinstance(layer, VocabParallelEmbedding) or isinstance(layer, ParallelLMHead)


def _wrap_dispatch(dispatch: Callable, fp16: bool, int4: bool) -> Callable:
    """vLLM's CPU GEMM dispatch with float16 weights for float32 layers (`fp16`) and an int4 copy in front of the
    float path for exactly-int4 layers (`int4`)."""

    @functools.wraps(dispatch)
    def wrapped(layer: torch.nn.Module, remove_weight: bool) -> None:
        # Taken before the float path runs: with remove_weight it leaves the layer an empty weight.
        weight = layer.weight if int4 and _applies(layer, tuple(INT4_MAX_TOKENS)) else None
        if fp16 and _applies(layer):
            layer.cpu_linear = fp16_linear(layer.weight)
            if remove_weight:  # as vLLM's own dispatch does: the packed copy is all the layer needs
                layer.weight = torch.nn.Parameter(torch.empty(0, dtype=layer.weight.dtype), requires_grad=False)
            _log_once("float32 linear layers run with float16 weights (fbgemm)")
        else:
            dispatch(layer, remove_weight)
        if weight is not None and (linear := int4_linear(weight, layer.cpu_linear)) is not None:
            layer.cpu_linear = linear
            _log_once("linear layers holding exact 4-bit groups run with int4 weights for batches of up to "
                      f"{INT4_MAX_TOKENS[weight.dtype]} tokens")

    setattr(wrapped, _MARK, True)
    return wrapped


@functools.cache
def _log_once(what: str) -> None:
    log.info("sovereign: %s on vLLM's CPU backend", what)


def register() -> None:
    """The plugin's entry point: wrap vLLM's CPU GEMM dispatch when the profile asks for float16 or exact int4
    weights (idempotent, CPU platform only). The choices arrive as environment variables: plugins run inside vLLM."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    fp16 = os.environ.get(LINEAR_WEIGHTS_ENV, "float32") == "float16"
    if fp16 and "fbgemm" not in torch.backends.quantized.supported_engines:
        log.warning("sovereign: this torch has no fbgemm float16 linear; linear layers keep float32 weights")
        fp16 = False
    int4 = os.environ.get(INT4_WEIGHTS_ENV, "off") == "exact" and int4_is_fast()
    from vllm.model_executor.layers import utils

    # linear.py and vocab_parallel_embedding.py import the function from this module when weights are processed.
    if (fp16 or int4) and not hasattr(utils.dispatch_cpu_unquantized_gemm, _MARK):
        utils.dispatch_cpu_unquantized_gemm = _wrap_dispatch(utils.dispatch_cpu_unquantized_gemm, fp16, int4)


def int4_is_fast() -> bool:
    """PyTorch's int4 kernel beats float weights only with AVX512-BF16 (on AVX2 it ran 10-20x slower)."""
    return torch.cpu._is_avx512_bf16_supported()
