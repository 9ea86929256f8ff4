"""LoRA training throughput and model FLOPs utilisation on a Llama-3-8B-shaped model with random weights.

    .venv/bin/python benchmarks/finetune/bench_gpu_mfu.py                       # on a CUDA GPU (H100/H200)
    .venv/bin/python benchmarks/finetune/bench_gpu_mfu.py --shape tiny --device cpu --peak-tflops 1   # smoke run

Nothing is downloaded: the model is built from its config with random bfloat16 weights, and the data are random
token rows packed the way the trainer packs conversations (several per row, position ids restarting, loss on about
half of each conversation, like assistant turns). The step is the trainer's own: `finetune.train.packed_loss_sum`
(per-conversation attention, logits only at trained positions), peft LoRA on every linear layer, AdamW on the
adapter weights.

FLOPs per step are counted from the shapes, not measured:
  * linear layers: 2 * N_linear per token forward, and 2 * N_linear backward (the frozen weights get no gradient,
    only the activations do), plus the LoRA matrices' own forward/backward/weight-gradient (6 * N_lora);
  * attention scores and values: 4 * d * (causal length) per token and layer forward, twice that backward;
  * the output layer only at trained positions.
`mfu` divides those FLOPs by the GPU's peak dense bf16 FLOPs. Peers quote MFU with 6 * N per token (full fine-tuning
convention); `mfu_6n` is that figure too, for comparison, though a LoRA step does not perform the weight-gradient
third of it. The result is printed and written as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from sovereign.offline import apply_offline_env  # noqa: E402

apply_offline_env()

import torch  # noqa: E402

from finetune.masking import IGNORE_INDEX  # noqa: E402
from finetune.packed_attention import NAME as PACKED_ATTENTION  # noqa: E402
from finetune.packing import Batch  # noqa: E402
from finetune.train import packed_loss_sum  # noqa: E402

SHAPES = {
    # Meta-Llama-3-8B's config.json
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=False),
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                 tie_word_embeddings=False),
}
# Dense bf16 peak (no sparsity), from NVIDIA's data sheets.
PEAK_TFLOPS = {"H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200": 989.4, "A100": 312.0}


def peak_tflops(device: torch.device, given: float | None) -> tuple[float, str]:
    if given is not None:
        return given, "given"
    if device.type != "cuda":
        raise SystemExit("--peak-tflops is required off CUDA (the peak of the device the run is measured on)")
    name = torch.cuda.get_device_name(device)
    if "H100" in name:
        key = "H100 NVL" if "NVL" in name else "H100 PCIe" if "PCIe" in name else "H100 SXM"
        return PEAK_TFLOPS[key], name
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value, name
    raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops")


def build_model(shape: str, rank: int, device: torch.device, dtype: torch.dtype, checkpointing: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], attn_implementation=PACKED_ATTENTION, use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    return model, config


def make_batches(config, n: int, rows: int, seq_len: int, seed: int) -> list[Batch]:
    """Rows filled with conversations of 256..1024 tokens (the last one cut to fit), loss on their second half."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, config.vocab_size, (rows, seq_len), generator=gen)
        pos = torch.empty(rows, seq_len, dtype=torch.long)
        targets = torch.full((rows, seq_len), IGNORE_INDEX, dtype=torch.long)
        for r in range(rows):
            at = 0
            while at < seq_len:
                length = min(int(torch.randint(256, 1025, (1,), generator=gen)), seq_len - at)
                pos[r, at:at + length] = torch.arange(length)
                half = at + length // 2
                targets[r, half:at + length - 1] = ids[r, half + 1:at + length]
                at += length
        out.append(Batch(ids, pos, targets, rows * seq_len, int((targets != IGNORE_INDEX).sum())))
    return out


def step_flops(config, batch: Batch, n_lora: int) -> float:
    h, L = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = h * (h + 2 * kv + h) + 3 * h * config.intermediate_size  # q, k, v, o, gate, up, down
    tokens = batch.n_tokens
    linear = 4 * per_layer * L * tokens  # forward + activation gradients
    lora = 6 * n_lora * tokens
    # causal attention per conversation: sum over positions of (position + 1), scores and values, fwd + 2x bwd
    causal = float((batch.position_ids + 1).sum())
    attention = 3 * 4 * h * L * causal
    head = 4 * h * config.vocab_size * batch.n_targets  # frozen output layer at trained positions: fwd + input grad
    return linear + lora + attention + head


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--rows", type=int, default=1, help="packed rows per micro batch")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps (after 2 warm-up steps)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (less memory, ~1/3 more FLOPs "
                   "performed; mfu still counts model FLOPs only)")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_gpu_mfu.json")
    args = p.parse_args()

    device = torch.device(args.device)
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    dtype = torch.bfloat16
    model, config = build_model(args.shape, args.rank, device, dtype, args.checkpointing)
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    n_lora = sum(q.numel() for q in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    batches = make_batches(config, 2 + args.steps, args.rows, args.seq_len, seed=0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    times, losses = [], []
    for i, batch in enumerate(batches):
        b = batch.to(device)
        sync()
        t0 = time.perf_counter()
        loss = packed_loss_sum(model, b) / b.n_targets
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t0)
            losses.append(loss.detach().item())
    timed = batches[2:]
    flops = sum(step_flops(config, b, n_lora) for b in timed)
    tokens = sum(b.n_tokens for b in timed)
    seconds = sum(times)
    n_params = sum(q.numel() for q in model.parameters())
    result = {
        "shape": args.shape,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "peak_tflops": peak, "peak_source": peak_source, "seq_len": args.seq_len, "rows": args.rows,
        "rank": args.rank, "checkpointing": args.checkpointing, "params": n_params, "lora_params": n_lora,
        "steps": len(times), "tokens_per_s": tokens / seconds, "step_s_median": statistics.median(times),
        "model_tflops_per_s": flops / seconds / 1e12, "mfu": flops / seconds / (peak * 1e12),
        "mfu_6n": 6 * n_params * tokens / seconds / (peak * 1e12), "losses": losses,
        "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "torch": torch.__version__, "cpus": os.cpu_count(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.shape} LoRA r={args.rank} on {result['device']}: {result['tokens_per_s']:,.0f} tokens/s, "
          f"{result['model_tflops_per_s']:.1f} model TFLOP/s, MFU {result['mfu'] * 100:.1f} % "
          f"(6N convention {result['mfu_6n'] * 100:.1f} %; goal >= 55 % on H100)")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
