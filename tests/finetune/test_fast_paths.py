"""The trainer's two CPU fast paths compute what the plain ones do: per-conversation attention for packed rows, and
LoRA dropout from cheap random bits."""

from __future__ import annotations

import pytest
import torch

from finetune.fast_dropout import FastDropout, use_fast_lora_dropout
from finetune.packed_attention import NAME as PACKED


def tiny_llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg)


def packed_batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (2, 40), generator=gen)
    # row 0: conversations of 15, 20 and a 5-token padded tail; row 1: one conversation of 40
    pos = torch.stack([torch.cat([torch.arange(15), torch.arange(20), torch.arange(5)]), torch.arange(40)])
    return ids, pos


def test_packed_attention_matches_sdpa_with_its_block_diagonal_mask_forward_and_backward():
    ids, pos = packed_batch()
    results = {}
    for attn in ("sdpa", PACKED):
        model = tiny_llama(attn)
        model.train()
        out = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        loss = out.float().logsumexp(-1).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[attn] = (out.detach(), grads)
    (a, ga), (b, gb) = results["sdpa"], results[PACKED]
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=1e-5, rtol=1e-3, msg=name)


def test_packed_attention_keeps_conversations_apart():
    ids, pos = packed_batch()
    model = tiny_llama(PACKED).eval()
    with torch.no_grad():
        packed = model(input_ids=ids[:1], position_ids=pos[:1]).logits
        alone = model(input_ids=ids[:1, 15:35], position_ids=torch.arange(20)[None]).logits
    torch.testing.assert_close(packed[:, 15:35], alone, atol=1e-5, rtol=1e-4)


def test_packed_attention_falls_back_to_sdpa_for_padded_generation():
    model = tiny_llama(PACKED).eval()
    ref = tiny_llama("sdpa").eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, want)


def test_fast_dropout_drops_at_rate_p_and_keeps_the_mean():
    torch.manual_seed(0)
    d = FastDropout(0.05).train()
    x = torch.ones(1000, 1000)
    y = d(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.05) < 0.002, dropped
    assert abs(y.mean().item() - 1.0) < 0.005
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - d.p)))
    # independent across elements: neighbours are not dropped together more often than chance
    pairs = ((y[:, :-1] == 0) & (y[:, 1:] == 0)).float().mean().item()
    assert abs(pairs - 0.05 ** 2) < 0.001, pairs


def test_fast_dropout_follows_the_torch_generator_and_is_identity_in_eval():
    d = FastDropout(0.1).train()
    x = torch.randn(64, 64)
    torch.manual_seed(7)
    a = d(x)
    torch.manual_seed(7)
    b = d(x)
    assert torch.equal(a, b)
    assert torch.equal(d.eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)
    with pytest.raises(ValueError):
        FastDropout(1.0)


def test_peft_lora_dropouts_are_swapped_and_gradients_still_flow():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama("sdpa"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                          target_modules=["q_proj", "v_proj"]))
    assert use_fast_lora_dropout(model) == 4  # 2 layers x 2 modules
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules() if m.__class__ is torch.nn.Dropout
                   and m.p == 0.1)
    model.train()
    ids, pos = packed_batch()
    model(input_ids=ids, position_ids=pos).logits.mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_segments_follow_the_content_of_position_ids_not_their_address():
    from finetune.packed_attention import segments

    pos = torch.cat([torch.arange(10), torch.arange(30)])[None]
    assert segments(pos) == [[(0, 10), (10, 40)]]
    # the next step's position ids often land at the same address with the same shape
    pos[0] = torch.cat([torch.arange(25), torch.arange(15)])
    assert segments(pos) == [[(0, 25), (25, 40)]]
    assert segments(torch.arange(1, 9)[None]) == [[(0, 8)]]  # no restart at all: one segment
