"""vLLM's C++ RMSNorm kernels offered to its IR-op dispatch on CPU: the same results as vLLM's native
implementation, chosen by the serving profile, and skipped for arguments the kernel does not take."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from vllm import ir  # noqa: E402

from serving import cpu_norm_ops  # noqa: E402
from serving.profile import NORM_PROVIDER, ServingProfile  # noqa: E402

cpu_norm_ops.register()


def test_the_kernels_match_vllms_native_norms():
    gen = torch.Generator().manual_seed(0)
    x, residual, weight = (torch.randn(16, 576, generator=gen) for _ in range(3))
    weight = weight[0]
    native = ir.ops.rms_norm.impls["native"].impl_fn(x, weight, 1e-5)
    torch.testing.assert_close(cpu_norm_ops.rms_norm(x, weight, 1e-5), native)
    out, res = ir.ops.fused_add_rms_norm.impls["native"].impl_fn(x, residual, weight, 1e-5)
    x2, r2 = x.clone(), residual.clone()
    got, got_res = cpu_norm_ops.fused_add_rms_norm(x2, r2, weight, 1e-5)
    assert got is x2 and got_res is r2  # in place, as vLLM's kernel works
    torch.testing.assert_close(got, out)
    torch.testing.assert_close(got_res, res)


def test_dispatch_prefers_the_kernel_and_falls_back_where_it_cannot_apply():
    x, weight = torch.randn(4, 64), torch.randn(64)
    with ir.ops.rms_norm.set_priority([NORM_PROVIDER, "native"]):
        assert ir.ops.rms_norm.dispatch(x, weight, 1e-5).provider == NORM_PROVIDER
        assert ir.ops.rms_norm.dispatch(x, weight, 1e-5, 32).provider == "native"  # a variance_size
        assert ir.ops.rms_norm.dispatch(x.t(), torch.randn(4), 1e-5).provider == "native"  # not contiguous
        assert ir.ops.rms_norm.dispatch(x, None, 1e-5).provider == "native"


def test_the_profile_puts_the_kernel_first_unless_told_native():
    args = ServingProfile.named("cpu").vllm_args(Path("/models/m"), "m")
    config = json.loads(args[args.index("--kernel-config") + 1])
    assert config["ir_op_priority"] == {"rms_norm": [NORM_PROVIDER], "fused_add_rms_norm": [NORM_PROVIDER]}
    native = ServingProfile.named("cpu", cpu_rms_norm="native").vllm_args(Path("/models/m"), "m")
    assert "--kernel-config" not in native
    gpu = ServingProfile.named("gpu").vllm_args(Path("/models/m"), "m")
    assert "--kernel-config" not in gpu
