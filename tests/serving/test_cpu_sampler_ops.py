"""The logprob rank count without torch.compile on the CPU backend (serving/cpu_sampler_ops.py)."""

from __future__ import annotations

from importlib.metadata import entry_points

import torch

from serving import cpu_sampler_ops as ours


def test_the_plugin_is_registered_and_replaces_the_compiled_count_where_the_sampler_calls_it():
    from vllm.v1.sample import sampler
    from vllm.v1.sample.ops import logprobs

    compiled = logprobs.batched_count_greater_than
    (plugin,) = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "sovereign_cpu_sampler"]
    try:
        plugin.load()()
        assert sampler.batched_count_greater_than is ours.batched_count_greater_than
        assert logprobs.batched_count_greater_than is ours.batched_count_greater_than
    finally:
        sampler.batched_count_greater_than = logprobs.batched_count_greater_than = compiled


def test_ranks_count_every_entry_at_least_the_chosen_tokens_score_for_any_batch_size():
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 2, 5):  # the compiled version specialised on 1 vs more; the count must not care
        x = torch.randn(batch, 49_152, generator=gen).log_softmax(-1)
        chosen = torch.randint(0, x.shape[1], (batch, 1), generator=gen)
        values = x.gather(-1, chosen)
        ranks = ours.batched_count_greater_than(x, values)
        expected = [int((x[i] >= values[i, 0]).sum()) for i in range(batch)]
        assert ranks.tolist() == expected
        # the rank is 1 + the number of tokens that scored higher, as vLLM reports it
        order = x.argsort(-1, descending=True)
        assert [int((order[i] == chosen[i, 0]).nonzero()) + 1 for i in range(batch)] == expected
