"""Packing plans and collation: capacity respected, every conversation once, boundaries visible to the model."""

from __future__ import annotations

import random

from finetune.masking import IGNORE_INDEX, Encoded
from finetune.packing import Example, collate, group_micro_batches, pack_rows, plan_epoch, plan_training


def lengths_of(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(20, 300) for _ in range(n)]


def test_rows_respect_capacity_and_hold_every_example_once():
    lengths = lengths_of(200)
    rows = pack_rows(lengths, range(200), 512)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    # first-fit leaves little room: far fewer rows than conversations, and well filled on average
    fill = sum(lengths) / (len(rows) * 512)
    assert len(rows) < 200 / 2 and fill > 0.85


def test_no_packing_means_one_conversation_per_row():
    rows = pack_rows([10, 20, 30], [2, 0, 1], 512, packing=False)
    assert rows == [[2], [0], [1]]


def test_micro_batches_stay_within_the_token_budget_when_padded():
    lengths = lengths_of(300, seed=1)
    rows = pack_rows(lengths, range(300), 512)
    for mb in group_micro_batches(rows, lengths, 2048):
        widest = max(sum(lengths[i] for i in row) for row in mb)
        assert len(mb) * widest <= 2048


def test_plan_is_deterministic_and_differs_between_epochs():
    lengths = lengths_of(100)
    kw = dict(seed=7, max_seq_len=512, micro_batch_tokens=1024, accumulation=2)
    assert plan_epoch(lengths, epoch=0, **kw) == plan_epoch(lengths, epoch=0, **kw)
    assert plan_epoch(lengths, epoch=0, **kw) != plan_epoch(lengths, epoch=1, **kw)
    plan = plan_training(lengths, epochs=3, max_steps=10, **{k: v for k, v in kw.items()})
    assert len(plan) == 10 and plan[0][0] == 0


def test_a_batch_size_makes_every_step_that_many_conversations():
    lengths = lengths_of(100, seed=3)
    kw = dict(seed=7, max_seq_len=512, micro_batch_tokens=1024, accumulation=2)
    for epoch in (0, 1):
        steps = plan_epoch(lengths, epoch=epoch, batch_size=16, **kw)
        counts = [sum(len(row) for mb in step for row in mb) for step in steps]
        assert counts == [16] * 6 + [4]  # 100 conversations: six full steps and the rest
        seen = [i for step in steps for mb in step for row in mb for i in row]
        assert sorted(seen) == list(range(100))  # each once per epoch
        for mb in (mb for step in steps for mb in step):
            assert len(mb) * max(sum(lengths[i] for i in row) for row in mb) <= 1024
    plan = plan_training(lengths, epochs=2, batch_size=16, **kw)
    assert len(plan) == 14


def test_collate_restarts_positions_and_shifts_targets_within_each_conversation():
    a = Example.from_encoded(Encoded([1, 10, 11, 2], [IGNORE_INDEX, IGNORE_INDEX, 11, 2]))
    b = Example.from_encoded(Encoded([1, 20, 21, 22, 2], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 22, 2]))
    c = Example.from_encoded(Encoded([1, 30, 2], [IGNORE_INDEX, 30, 2]))
    batch = collate([[0, 1], [2]], [a, b, c], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 10, 11, 2, 1, 20, 21, 22, 2], [1, 30, 2, 0, 0, 0, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4], [0, 1, 2, 0, 1, 2, 3, 4, 5]]
    # target at t is the label at t+1 of the same conversation; the last token of a conversation predicts nothing,
    # so the loss never asks conversation a's end to predict conversation b's start
    assert batch.targets.tolist() == [[-100, 11, 2, -100, -100, -100, 22, 2, -100],
                                      [30, 2, -100, -100, -100, -100, -100, -100, -100]]
    assert batch.n_targets == 6 and batch.n_tokens == 12
