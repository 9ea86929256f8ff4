"""Float16 weights for vLLM's float32 linear layers on CPU: the products match float32 within float16's precision,
the plugin wraps vLLM's CPU GEMM dispatch only when the profile asks, and leaves alone what it does not apply to."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from vllm.model_executor.layers import utils as vllm_utils  # noqa: E402
from vllm.model_executor.layers.vocab_parallel_embedding import (  # noqa: E402
    ParallelLMHead,
    VocabParallelEmbedding,
)

from serving import cpu_linear_ops  # noqa: E402
from serving.profile import LINEAR_WEIGHTS_ENV, ServingProfile  # noqa: E402


def _close_to_float32(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    ref = torch.nn.functional.linear(x, w, b)
    assert got.shape == ref.shape and got.dtype == torch.float32
    # float16 keeps 11 significant bits: each product is off by <= 2^-11 relative, far less in a sum of many.
    assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()


@pytest.mark.parametrize("shape", [(1, 64), (7, 64), (2, 3, 64)])
def test_the_float16_product_matches_float32(shape):
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 64, generator=gen) * 0.05, torch.randn(96, generator=gen)
    x = torch.randn(*shape, generator=gen)
    linear = cpu_linear_ops.fp16_linear(w)
    _close_to_float32(linear(x, w, b), x, w, b)
    _close_to_float32(linear(x, w, None), x, w, None)
    xt = torch.randn(64, 5, generator=gen).t()  # a transposed view, as a slice of a fused output can be
    _close_to_float32(linear(xt, w, None), xt, w, None)


def _layer(cls: type = torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    layer = cls.__new__(cls)  # vLLM's layer classes need a distributed group to construct; only the type matters
    torch.nn.Module.__init__(layer)
    layer.weight = torch.nn.Parameter(torch.randn(48, 32).to(dtype), requires_grad=False)
    return layer


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[torch.nn.Module] = []

    def __call__(self, layer: torch.nn.Module, remove_weight: bool) -> None:
        self.calls.append(layer)
        layer.cpu_linear = torch.nn.functional.linear


def test_the_wrapped_dispatch_packs_float32_weights_and_passes_the_rest_on():
    vllm_own = _Recorder()
    dispatch = cpu_linear_ops._with_fp16_weights(vllm_own)
    x = torch.randn(3, 32)

    linear = _layer()
    w = linear.weight.detach().clone()
    dispatch(linear, remove_weight=True)
    assert linear.weight.numel() == 0  # the packed float16 copy replaces the float32 weight, as vLLM's oneDNN does
    _close_to_float32(linear.cpu_linear(x, linear.weight, None), x, w, None)

    head = _layer(ParallelLMHead)
    dispatch(head, remove_weight=False)
    assert head.weight.numel() == 48 * 32  # a tied lm_head shares its weight with the embedding's lookups
    _close_to_float32(head.cpu_linear(x, head.weight, None), x, head.weight, None)

    embedding, bf16 = _layer(VocabParallelEmbedding), _layer(dtype=torch.bfloat16)
    dispatch(embedding, remove_weight=False)
    dispatch(bf16, remove_weight=True)
    assert vllm_own.calls == [embedding, bf16]  # an input embedding is only looked up; bf16 is not ours to change
    assert vllm_own.calls[0].cpu_linear is torch.nn.functional.linear


def test_register_wraps_vllms_dispatch_only_when_the_profile_asks(monkeypatch):
    original = vllm_utils.dispatch_cpu_unquantized_gemm
    monkeypatch.setattr(vllm_utils, "dispatch_cpu_unquantized_gemm", original)
    monkeypatch.setenv(LINEAR_WEIGHTS_ENV, "float32")
    cpu_linear_ops.register()
    assert vllm_utils.dispatch_cpu_unquantized_gemm is original
    monkeypatch.setenv(LINEAR_WEIGHTS_ENV, "float16")
    cpu_linear_ops.register()
    wrapped = vllm_utils.dispatch_cpu_unquantized_gemm
    assert wrapped is not original and wrapped.__wrapped__ is original
    cpu_linear_ops.register()
    assert vllm_utils.dispatch_cpu_unquantized_gemm is wrapped  # idempotent: vLLM loads plugins in every process


def test_the_profile_hands_the_choice_to_vllms_processes():
    assert ServingProfile.named("cpu").vllm_env()[LINEAR_WEIGHTS_ENV] == "float16"
    assert ServingProfile.named("cpu", cpu_linear_weights="float32").vllm_env()[LINEAR_WEIGHTS_ENV] == "float32"
    assert LINEAR_WEIGHTS_ENV not in ServingProfile.named("gpu").vllm_env()
    assert "--dtype" in (args := ServingProfile.named("cpu").vllm_args(Path("/m"), "m"))
    assert args[args.index("--dtype") + 1] == "float32"  # activations and the KV cache stay float32
