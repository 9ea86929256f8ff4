"""The grouped multi-LoRA ops that replace vLLM's CPU torch ops: same results as vLLM's where vLLM is right, a zero
delta for tokens without an adapter (vLLM's ops gave them the last slot's adapter), and the plugin is what vLLM's
CPU punica wrapper calls once vLLM has loaded its general plugins."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from vllm.lora.ops.torch_ops import lora_ops as vllm_ops  # noqa: E402

from serving import cpu_lora_ops as ours  # noqa: E402

SLOTS, RANK, HIDDEN, OUT = 4, 8, 48, 40


def _weights(gen: torch.Generator, out: int, inp: int) -> torch.Tensor:
    return torch.randn(SLOTS, 1, out, inp, generator=gen)


def _reference_delta(x: torch.Tensor, stacked: torch.Tensor, indices: list[int], scale: float = 1.0) -> torch.Tensor:
    """Row by row: the slot's weights times the row, or nothing for -1."""
    rows = []
    for row, slot in zip(x, indices):
        rows.append(torch.zeros(stacked.shape[-2]) if slot < 0 else scale * stacked[slot, 0] @ row)
    return torch.stack(rows)


MIXED = [2, -1, 0, 2, 3, -1, 3, 0]


@pytest.mark.parametrize("indices", [MIXED, [1] * 8, [-1] * 8, [3, 3, -1, -1, 1, 1, 1, 1]])
def test_shrink_writes_each_rows_adapter_and_zero_for_rows_without_one(indices):
    gen = torch.Generator().manual_seed(0)
    x, a = torch.randn(len(indices), HIDDEN, generator=gen), _weights(gen, RANK, HIDDEN)
    out = torch.full((len(indices), RANK), 7.0)  # stale content must not survive
    ours.bgmv_shrink(x, a, out, torch.tensor(indices), 0.5)
    torch.testing.assert_close(out, _reference_delta(x, a, indices, 0.5))


@pytest.mark.parametrize("indices", [MIXED, [0] * 8, [-1] * 8])
def test_expand_adds_each_rows_delta_and_leaves_rows_without_an_adapter_alone(indices):
    gen = torch.Generator().manual_seed(1)
    x, b = torch.randn(len(indices), RANK, generator=gen), _weights(gen, OUT, RANK)
    base = torch.randn(len(indices), OUT, generator=gen)
    out = base.clone()
    ours.bgmv_expand(x, b, out, torch.tensor(indices), add_inputs=True)
    torch.testing.assert_close(out, base + _reference_delta(x, b, indices))


def test_expand_slice_touches_only_its_columns():
    gen = torch.Generator().manual_seed(2)
    x, b = torch.randn(len(MIXED), RANK, generator=gen), _weights(gen, 16, RANK)
    base = torch.randn(len(MIXED), OUT, generator=gen)
    out = base.clone()
    ours.bgmv_expand_slice(x, b, out, torch.tensor(MIXED), 8, 16, add_inputs=True)
    expected = base.clone()
    expected[:, 8:24] += _reference_delta(x, b, MIXED)
    torch.testing.assert_close(out, expected)
    out = base.clone()
    ours.bgmv_expand_slice(x, b, out, torch.tensor(MIXED), 8, 16, add_inputs=False)
    expected[:, 8:24] = _reference_delta(x, b, MIXED)
    torch.testing.assert_close(out, expected)


def test_segment_ops_match_vllms_own_when_every_token_has_an_adapter():
    gen = torch.Generator().manual_seed(3)
    seg_slots, seg_lens = torch.tensor([1, 0, 3]), torch.tensor([3, 1, 4])
    n = int(seg_lens.sum())
    starts = torch.cumsum(seg_lens, 0) - seg_lens
    meta = (starts, seg_lens, seg_slots, 3, int(seg_lens.max()), n)
    x, a, b = torch.randn(n, HIDDEN, generator=gen), _weights(gen, RANK, HIDDEN), _weights(gen, OUT, RANK)
    theirs_y, ours_y = torch.zeros(n, RANK), torch.zeros(n, RANK)
    vllm_ops.sgmv_shrink(x, a, theirs_y, *meta, 0.25)
    ours.sgmv_shrink(x, a, ours_y, *meta, 0.25)
    torch.testing.assert_close(ours_y, theirs_y)
    base = torch.randn(n, OUT + 8, generator=gen)
    theirs_o, ours_o = base.clone(), base.clone()
    vllm_ops.sgmv_expand_slice(ours_y, b, theirs_o, *meta, 4, OUT, True)
    ours.sgmv_expand_slice(ours_y, b, ours_o, *meta, 4, OUT, True)
    torch.testing.assert_close(ours_o, theirs_o)


def test_vllms_own_ops_give_base_tokens_the_last_slots_adapter():
    """Why the plugin exists beyond speed: pins the upstream behaviour it corrects (delete once vLLM fixes it)."""
    gen = torch.Generator().manual_seed(4)
    x, b = torch.randn(2, RANK, generator=gen), _weights(gen, OUT, RANK)
    out = torch.zeros(2, OUT)
    vllm_ops.bgmv_expand(x, b, out, torch.tensor([-1, 0]), add_inputs=True)
    torch.testing.assert_close(out[0], b[SLOTS - 1, 0] @ x[0])


def test_the_plugin_is_registered_and_replaces_the_cpu_wrappers_ops():
    from importlib.metadata import entry_points

    from vllm.lora.punica_wrapper import punica_cpu

    (plugin,) = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "sovereign_cpu_lora"]
    plugin.load()()
    for name, op in ours.OPS.items():
        assert getattr(punica_cpu, name) is op, name


def test_the_profile_picks_the_ops_and_vllm_keeps_its_own_when_told(monkeypatch):
    from vllm.lora.punica_wrapper import punica_cpu

    from serving.profile import LORA_OPS_ENV, ServingProfile

    assert ServingProfile.named("cpu").vllm_env()[LORA_OPS_ENV] == "grouped"
    assert ServingProfile.named("cpu", cpu_lora_ops="vllm").vllm_env()[LORA_OPS_ENV] == "vllm"
    originals = {name: getattr(vllm_ops, name) for name in ours.OPS}
    for name, op in originals.items():
        monkeypatch.setattr(punica_cpu, name, op)
    monkeypatch.setenv(LORA_OPS_ENV, "vllm")
    ours.register()
    assert all(getattr(punica_cpu, name) is op for name, op in originals.items())


def test_groups_follow_the_indices_contents_not_the_tensor_they_live_in():
    """vLLM rewrites its index buffers in place every step: groups kept for the old contents must not come back."""
    idx = torch.tensor([0, -1, 1, 0])
    assert [(s, r.tolist()) for s, r in ours._groups(idx)] == [(0, [0, 3]), (1, [2])]
    idx.copy_(torch.tensor([-1, -1, -1, -1]))
    assert ours._groups(idx) == []
    idx.copy_(torch.tensor([1, 1, 1, 1]))
    assert ours._groups(idx) == [(1, None)]
    assert ours._groups(torch.tensor([0, -1, 1, 0], dtype=torch.int32))[0][1].tolist() == [0, 3]


def _wrapper_for(lora_ids: tuple[int, ...]):
    """vLLM's CPU punica wrapper with one step's metadata: token i uses LoRA id lora_ids[i] (0 = none)."""
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    wrapper = PunicaWrapperCPU(64, 4, "cpu")
    wrapper.update_metadata(LoRAMapping(lora_ids, lora_ids, is_prefill=False), [7, 8, None, None], SLOTS, 1000)
    return wrapper


def test_a_step_without_adapters_skips_the_lora_linear_and_one_with_them_applies_each_rows_adapter():
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    ours.register()
    assert hasattr(PunicaWrapperCPU.add_lora_linear, "__sovereign_wrapped__")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, HIDDEN, generator=gen)
    a, b = _weights(gen, RANK, HIDDEN), _weights(gen, OUT, RANK)
    y0 = torch.randn(3, OUT, generator=gen)

    y = y0.clone()
    _wrapper_for((0, 0, 0)).add_lora_linear(y, x, (a,), (b,), 0.5, (OUT,))
    torch.testing.assert_close(y, y0)

    y = y0.clone()
    _wrapper_for((8, 0, 7)).add_lora_linear(y, x, (a,), (b,), 0.5, (OUT,))
    expected = y0.clone()
    for row, slot in ((0, 1), (2, 0)):
        expected[row] += 0.5 * (b[slot, 0] @ (a[slot, 0] @ x[row]))
    torch.testing.assert_close(y, expected)
