"""Grouped multi-LoRA ops for vLLM's CPU backend, installed as a vLLM general plugin (entry point
`vllm.general_plugins`: every vLLM process of this environment loads it; it changes nothing off the CPU platform).

Why replace vLLM's own: its CPU punica wrapper uses torch ops that gather a private copy of every token's LoRA
weights (`weights[indices]`) and then einsum. Two costs follow, both measured with py-spy on the default model:
- the lm_head's LoRA op runs on every decode step even when no request in the batch uses an adapter; at 16
  concurrent streams that gather copies 16 x 49,152 x 16 floats a step, 24 % of the worker's time;
- a token with no adapter has index -1, which Python indexing turns into the *last* slot: in a batch mixing base
  and adapter requests, base requests got the last slot's adapter whenever one was loaded there.

Here each distinct adapter in the batch costs one matmul over its own rows, rows without an adapter are skipped
(their delta is zero), and a batch without adapters costs nothing. Semantics are otherwise vLLM's: shrink writes
`scale * x @ A.T`, expand adds (or writes) `x @ B.T` into a column range of the output.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from serving.profile import LORA_OPS_ENV

log = logging.getLogger("vllm.sovereign.cpu_lora_ops")

_Groups = list[tuple[int, torch.Tensor | None]]  # (slot, rows); rows None = every row


# A decode step calls the ops ~14 times per layer with the same indices; working out the groups costs more than a
# small matmul (18 µs with no adapter, 38 µs mixed), so they are kept by the indices' contents. A content key cannot
# go stale the way an address key can (a freed tensor's address is reused by the next step's different indices).
_CACHE: dict[tuple, _Groups] = {}
_CACHE_MAX = 256


def _groups(indices: torch.Tensor) -> _Groups:
    """The adapter slots present in `indices` with their rows; slot -1 (no adapter) is left out."""
    if indices.numel() == 0:
        return []
    key = (indices.dtype, indices.numpy().tobytes())
    groups = _CACHE.get(key)
    if groups is None:
        groups = _cache(key, _compute_groups(indices))
    return groups


def _cache(key: tuple, groups: _Groups) -> _Groups:
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
    _CACHE[key] = groups
    return groups


def _compute_groups(indices: torch.Tensor) -> _Groups:
    slots = torch.unique(indices).tolist()
    if len(slots) == 1:
        return [] if slots[0] < 0 else [(slots[0], None)]
    return [(s, (indices == s).nonzero().squeeze(1)) for s in slots if s >= 0]


def _weight(stacked: torch.Tensor, slot: int, dtype: torch.dtype) -> torch.Tensor:
    w = stacked[slot]
    if w.dim() == 3:  # (1, out, in) per slot in the 4-D layout
        w = w[0]
    return w.to(dtype)


def _covers_all(groups: _Groups) -> bool:
    return len(groups) == 1 and groups[0][1] is None


def _product(x: torch.Tensor, stacked: torch.Tensor, slot: int, rows: torch.Tensor | None,
             dtype: torch.dtype) -> torch.Tensor:
    xs = x if rows is None else x.index_select(0, rows)
    return xs.to(dtype) @ _weight(stacked, slot, dtype).t()


def _write(target: torch.Tensor, rows: torch.Tensor | None, value: torch.Tensor, add: bool) -> None:
    """target[rows] (+)= value, in place; `target` may be a column view of the real output."""
    if rows is None:
        if add:
            target += value
        else:
            target.copy_(value)
    elif add:
        target.index_add_(0, rows, value)
    else:
        target.index_copy_(0, rows, value)


def bgmv_shrink(inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, scaling: float = 1.0) -> None:
    rank = lora_a_weights.shape[-2]
    target = output_tensor[:, :rank]
    groups = _groups(lora_indices_tensor[: inputs.shape[0]])
    if not _covers_all(groups):
        target.zero_()
    for slot, rows in groups:
        _write(target, rows, _product(inputs, lora_a_weights, slot, rows, output_tensor.dtype) * scaling, add=False)


def bgmv_expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, add_inputs: bool = True) -> None:
    if inputs.shape[0] != output_tensor.shape[0]:  # vLLM's broadcast corner case: keep its own op
        return _VLLM_OPS["bgmv_expand"](inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
    width = min(lora_b_weights.shape[-2], output_tensor.shape[1])
    _expand_into(inputs, lora_b_weights, output_tensor[:, :width], lora_indices_tensor, add_inputs, width)


def bgmv_expand_slice(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                      lora_indices_tensor: torch.Tensor, slice_offset: int, slice_size: int,
                      add_inputs: bool = True) -> None:
    target = output_tensor[:, slice_offset: slice_offset + slice_size]
    _expand_into(inputs, lora_b_weights, target, lora_indices_tensor, add_inputs, slice_size)


def _expand_into(inputs: torch.Tensor, lora_b_weights: torch.Tensor, target: torch.Tensor,
                 lora_indices_tensor: torch.Tensor, add_inputs: bool, width: int) -> None:
    groups = _groups(lora_indices_tensor[: inputs.shape[0]])
    if not add_inputs and not _covers_all(groups):
        target.zero_()
    for slot, rows in groups:
        value = _product(inputs, lora_b_weights, slot, rows, target.dtype)[:, :width]
        _write(target, rows, value, add=add_inputs)


def _explode(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling):
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _explode(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs=False):
    bgmv_expand(inputs, lora_b_weights, output_tensor, _explode(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                      batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs=False):
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, _explode(lora_indices_tensor, seq_len_tensor),
                      slice_offset, slice_size, add_inputs)


OPS = {f.__name__: f for f in (bgmv_shrink, bgmv_expand, bgmv_expand_slice, sgmv_shrink, sgmv_expand,
                               sgmv_expand_slice)}
_VLLM_OPS: dict = {}


def _only_with_adapters(method, indices: str):
    """`method` of vLLM's CPU punica wrapper, skipped when no row of the step has an adapter (its delta is zero):
    saves the buffer allocations and the Python of ~7 op calls per LoRA module on every base-only step."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not _groups(getattr(self, indices)):
            return None
        return method(self, *args, **kwargs)

    wrapper.__sovereign_wrapped__ = method
    return wrapper


# Wrapper methods -> the per-step indices they apply: every token's for linear layers, sampled rows' for logits.
SKIPPED_WITHOUT_ADAPTERS = {"add_lora_linear": "token_lora_indices", "add_lora_logits": "sampler_indices"}


def register() -> None:
    """The plugin's entry point: swap the ops vLLM's CPU punica wrapper calls (idempotent, CPU platform only).

    The profile's choice arrives as an environment variable: a plugin runs inside vLLM's own processes.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or os.environ.get(LORA_OPS_ENV, "grouped") != "grouped":
        return
    from vllm.lora.punica_wrapper import punica_cpu

    for name, op in OPS.items():
        current = getattr(punica_cpu, name)
        if current is not op:
            _VLLM_OPS.setdefault(name, current)
            setattr(punica_cpu, name, op)
    wrapper_cls = punica_cpu.PunicaWrapperCPU
    for name, indices in SKIPPED_WITHOUT_ADAPTERS.items():
        current = getattr(wrapper_cls, name)
        if not hasattr(current, "__sovereign_wrapped__"):
            setattr(wrapper_cls, name, _only_with_adapters(current, indices))
    log.info("sovereign: grouped multi-LoRA ops installed for vLLM's CPU backend")
