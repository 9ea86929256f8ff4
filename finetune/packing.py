"""Packing: several conversations per row, rows into micro batches, micro batches into optimizer steps.

Why: padded batches spend most of their compute on pad tokens when conversation lengths vary (customer-service
turns run from 60 to 900 tokens). Rows here are filled first-fit up to `max_seq_len`, so padding is only the short
tail of a row. Each conversation restarts its position ids at 0; with no attention mask, transformers derives a
block-diagonal causal mask from those resets (masking_utils.find_packed_sequence_indices), so a token never attends
across a conversation boundary. `packing_is_isolated` proves that for a given model at setup; where it fails, the
trainer falls back to one conversation per row.

Targets are shifted per conversation before packing (target[t] = label[t + 1], the last one -100), so the loss never
predicts the first token of the next conversation from the last token of the previous one.

The plan is a pure function of the lengths, the seed and the settings: the same inputs give the same steps, which
is what makes resume exact (the data position is just the index of the next step).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from finetune.masking import IGNORE_INDEX, Encoded

Row = list[int]  # indices of examples, in order
MicroBatch = list[Row]
Step = list[MicroBatch]


@dataclass(frozen=True)
class Example:
    """One conversation ready to pack: its ids and the per-position next-token targets."""

    input_ids: list[int]
    targets: list[int]

    @classmethod
    def from_encoded(cls, enc: Encoded) -> "Example":
        return cls(list(enc.input_ids), list(enc.labels[1:]) + [IGNORE_INDEX])

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(1 for t in self.targets if t != IGNORE_INDEX)


def pack_rows(lengths: Sequence[int], order: Sequence[int], capacity: int, *, packing: bool = True) -> list[Row]:
    """First-fit packing of examples (visited in `order`) into rows of at most `capacity` tokens."""
    rows: list[Row] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the row capacity {capacity}")
        if packing:
            for r, room in enumerate(free):
                if room >= n:
                    rows[r].append(i)
                    free[r] -= n
                    break
            else:
                rows.append([i])
                free.append(capacity - n)
        else:
            rows.append([i])
    return rows


def group_micro_batches(rows: Sequence[Row], lengths: Sequence[int], micro_batch_tokens: int) -> list[MicroBatch]:
    """Consecutive rows into micro batches whose padded size (rows x longest row) stays within the budget."""
    batches: list[MicroBatch] = []
    cur: MicroBatch = []
    longest = 0
    for row in rows:
        n = sum(lengths[i] for i in row)
        if cur and (len(cur) + 1) * max(longest, n) > micro_batch_tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(row)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    return batches


def plan_epoch(lengths: Sequence[int], *, epoch: int, seed: int, max_seq_len: int, micro_batch_tokens: int,
               accumulation: int, packing: bool = True, shuffle: bool = True,
               batch_size: int | None = None) -> list[Step]:
    """The optimizer steps of one epoch: shuffled (seeded by seed and epoch), packed, grouped, accumulated.

    `batch_size`: each step is that many conversations (the last one fewer), packed and grouped on their own;
    `accumulation` is then unused."""
    order = list(range(len(lengths)))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    if batch_size is not None:
        return [group_micro_batches(pack_rows(lengths, order[i:i + batch_size], max_seq_len, packing=packing),
                                    lengths, micro_batch_tokens) for i in range(0, len(order), batch_size)]
    rows = pack_rows(lengths, order, max_seq_len, packing=packing)
    micro = group_micro_batches(rows, lengths, micro_batch_tokens)
    return [micro[i:i + accumulation] for i in range(0, len(micro), accumulation)]


def plan_training(lengths: Sequence[int], *, epochs: int, seed: int, max_seq_len: int, micro_batch_tokens: int,
                  accumulation: int, packing: bool = True, max_steps: int | None = None,
                  batch_size: int | None = None) -> list[tuple[int, Step]]:
    """Every optimizer step of the run as (epoch, step), cut at max_steps."""
    plan: list[tuple[int, Step]] = []
    for epoch in range(epochs):
        for step in plan_epoch(lengths, epoch=epoch, seed=seed, max_seq_len=max_seq_len,
                               micro_batch_tokens=micro_batch_tokens, accumulation=accumulation, packing=packing,
                               batch_size=batch_size):
            plan.append((epoch, step))
            if max_steps is not None and len(plan) >= max_steps:
                return plan
    return plan


@dataclass
class Batch:
    input_ids: torch.Tensor  # (rows, length)
    position_ids: torch.Tensor  # restart at 0 for every conversation, and for the padded tail
    targets: torch.Tensor  # next-token ids, -100 where the loss does not look
    n_tokens: int  # real (non-pad) tokens
    n_targets: int  # tokens the loss counts

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.position_ids.to(device), self.targets.to(device),
                     self.n_tokens, self.n_targets)


def collate(batch: MicroBatch, examples: Sequence[Example], pad_id: int) -> Batch:
    """Tensors for one micro batch; the padded tail of a row is its own position-0 segment and never trains."""
    rows_ids, rows_pos, rows_tgt = [], [], []
    for row in batch:
        ids: list[int] = []
        pos: list[int] = []
        tgt: list[int] = []
        for i in row:
            ex = examples[i]
            ids += ex.input_ids
            pos += range(len(ex))
            tgt += ex.targets
        rows_ids.append(ids)
        rows_pos.append(pos)
        rows_tgt.append(tgt)
    width = max(len(r) for r in rows_ids)
    n_tokens = sum(len(r) for r in rows_ids)
    for ids, pos, tgt in zip(rows_ids, rows_pos, rows_tgt):
        pad = width - len(ids)
        ids += [pad_id] * pad
        pos += range(pad)
        tgt += [IGNORE_INDEX] * pad
    targets = torch.tensor(rows_tgt, dtype=torch.long)
    return Batch(torch.tensor(rows_ids, dtype=torch.long), torch.tensor(rows_pos, dtype=torch.long), targets,
                 n_tokens, int((targets != IGNORE_INDEX).sum()))


@torch.no_grad()
def packing_is_isolated(model: torch.nn.Module, *, vocab_size: int, device: torch.device | str = "cpu",
                        atol: float = 1e-4) -> bool:
    """True when this model, fed two packed conversations, gives each the outputs it gets alone."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(3, vocab_size, (1, 7), generator=gen)
    b = torch.randint(3, vocab_size, (1, 5), generator=gen)
    was_training = model.training
    model.eval()
    try:
        def run(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            return model(input_ids=ids.to(device), position_ids=pos.to(device), use_cache=False).logits.float().cpu()

        alone_b = run(b, torch.arange(5)[None])
        packed = run(torch.cat([a, b], 1), torch.cat([torch.arange(7), torch.arange(5)])[None])
    finally:
        model.train(was_training)
    return bool(torch.allclose(packed[:, 7:], alone_b, atol=atol, rtol=1e-3))
