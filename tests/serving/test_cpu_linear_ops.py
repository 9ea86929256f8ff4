"""Float16 weights for vLLM's float32 linear layers on CPU, and int4 weights where they are exact: the products match
float32 within float16's (bfloat16's) precision, int4 is taken only for exact 4-bit groups and small batches, the
plugin wraps vLLM's CPU GEMM dispatch only when the profile asks, and leaves alone what it does not apply to."""

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
from serving.profile import INT4_WEIGHTS_ENV, LINEAR_WEIGHTS_ENV, ServingProfile  # noqa: E402


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
    dispatch = cpu_linear_ops._wrap_dispatch(vllm_own, fp16=True, int4=False)
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


def _q4_1(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    """A Q4_1 GGUF tensor dequantized: per group of 32 inputs, levels 0..15 (both ends used) * float16 d + float16 m."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 16, (out_f, in_f // 32, 32), generator=gen)
    levels[..., 0], levels[..., 1] = 0, 15
    d = (torch.rand(out_f, in_f // 32, 1, generator=gen) * 0.01 + 1e-3).half().float()
    m = (torch.randn(out_f, in_f // 32, 1, generator=gen) * 0.05).half().float()
    return (levels * d + m).reshape(out_f, in_f)


def test_exact_int4_groups_are_found_and_multiply_like_float32():
    w = _q4_1(96, 128)
    assert cpu_linear_ops.exact_int4(w) is not None
    assert cpu_linear_ops.exact_int4(w.to(torch.bfloat16)) is not None  # the same levels in a bfloat16 model
    assert cpu_linear_ops.exact_int4(torch.randn(96, 128) * 0.02) is None  # plain float weights: no levels
    off_grid = w.clone()
    off_grid[5, 40] += 0.3 * (off_grid[5, 32:64].amax() - off_grid[5, 32:64].amin()) / 15  # a weight off its level
    assert cpu_linear_ops.exact_int4(off_grid) is None
    assert cpu_linear_ops.exact_int4(w[:, :100]) is None  # groups of 32 must tile the input

    calls = []

    def float_path(x, _w, b):
        calls.append(x.shape)
        return torch.nn.functional.linear(x, w, b)

    linear = cpu_linear_ops.int4_linear(w, float_path)
    gen = torch.Generator().manual_seed(1)
    b = torch.randn(96, generator=gen)
    for shape in [(1, 128), (2, 8, 128)]:  # 1 and 16 tokens: the int4 kernel, on bfloat16 activations
        x = torch.randn(*shape, generator=gen)
        got, ref = linear(x, w, b), torch.nn.functional.linear(x, w, b)
        assert got.shape == ref.shape and got.dtype == torch.float32
        assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()  # bfloat16 keeps 8 significant bits
    assert calls == []
    linear(torch.randn(17, 128), w, b)  # above INT4_MAX_TOKENS the float path is faster
    assert calls == [(17, 128)]


def test_the_wrapped_dispatch_puts_int4_in_front_of_the_float_path_for_exact_layers_only():
    vllm_own = _Recorder()
    dispatch = cpu_linear_ops._wrap_dispatch(vllm_own, fp16=True, int4=True)
    exact, plain = _layer(), _layer()
    exact.weight = torch.nn.Parameter(_q4_1(48, 32), requires_grad=False)
    w = exact.weight.detach().clone()
    dispatch(exact, remove_weight=True)
    dispatch(plain, remove_weight=True)
    assert exact.cpu_linear.__qualname__.startswith("int4_linear")
    assert plain.cpu_linear.__qualname__.startswith("fp16_linear")
    x = torch.randn(3, 32)
    ref = torch.nn.functional.linear(x, w)
    assert (exact.cpu_linear(x, exact.weight, None) - ref).abs().max() <= 2e-2 * ref.abs().max()
    x40 = torch.randn(40, 32)  # above INT4_MAX_TOKENS: the float16 path, float16's precision
    _close_to_float32(exact.cpu_linear(x40, exact.weight, None), x40, w, None)

    bf16 = _layer(dtype=torch.bfloat16)
    bf16.weight = torch.nn.Parameter(_q4_1(48, 32).to(torch.bfloat16), requires_grad=False)
    dispatch(bf16, remove_weight=False)
    assert vllm_own.calls == [bf16]  # vLLM's own float path for a bfloat16 model, the int4 copy in front of it
    assert bf16.cpu_linear.__qualname__.startswith("int4_linear")


def test_register_wraps_vllms_dispatch_only_when_the_profile_asks(monkeypatch):
    original = vllm_utils.dispatch_cpu_unquantized_gemm
    monkeypatch.setattr(vllm_utils, "dispatch_cpu_unquantized_gemm", original)
    monkeypatch.setenv(LINEAR_WEIGHTS_ENV, "float32")
    monkeypatch.setenv(INT4_WEIGHTS_ENV, "off")
    cpu_linear_ops.register()
    assert vllm_utils.dispatch_cpu_unquantized_gemm is original
    monkeypatch.setattr(cpu_linear_ops, "int4_is_fast", lambda: False)
    monkeypatch.setenv(INT4_WEIGHTS_ENV, "exact")
    cpu_linear_ops.register()
    assert vllm_utils.dispatch_cpu_unquantized_gemm is original  # a CPU where int4 would be slower: left alone
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
    assert ServingProfile.named("cpu").vllm_env()[INT4_WEIGHTS_ENV] == "exact"
    assert ServingProfile.named("cpu", cpu_int4_weights="off").vllm_env()[INT4_WEIGHTS_ENV] == "off"
    assert "--dtype" in (args := ServingProfile.named("cpu").vllm_args(Path("/m"), "m"))
    assert args[args.index("--dtype") + 1] == "float32"  # activations and the KV cache stay float32
