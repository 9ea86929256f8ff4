"""Dedup on its own: what counts as the same conversation, and rows that share a source line (compact JSON arrays)."""

from __future__ import annotations

from finetune.dedup import dedup, exact_key, overlaps
from finetune.intake import Row


def _conv(answer_weight=None, name=None):
    draft = {"role": "assistant", "content": "draft"}
    if answer_weight is not None:
        draft["weight"] = answer_weight
    user = {"role": "user", "content": "hi"}
    if name is not None:
        user["name"] = name
    return [user, draft, {"role": "user", "content": "again"}, {"role": "assistant", "content": "final"}]


def test_conversations_that_train_differently_are_not_exact_duplicates():
    assert exact_key(_conv(0)) != exact_key(_conv(1))
    assert exact_key(_conv(name="alice")) != exact_key(_conv(name="bob"))
    assert exact_key(_conv(1)) == exact_key(_conv())  # an assistant turn trains unless weight is 0
    kept, report = dedup([Row(1, {"messages": _conv(0)}), Row(2, {"messages": _conv(1)})], near=False)
    assert [r.line for r in kept] == [1, 2] and report.exact_removed == 0


def test_rows_of_a_compact_json_array_dedup_by_record():
    texts = ["where is my parcel to Oslo", "how do I change my password", "where is my parcel to Oslo"]
    rows = [Row(1, {"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": f"answer: {t}"}]},
                record=i) for i, t in enumerate(texts, start=1)]
    kept, report = dedup(rows, threshold=0.85)
    assert [r.record for r in kept] == [1, 2]
    assert [(x.line, x.record, x.duplicate_of, x.duplicate_of_record, x.kind) for x in report.removed] == [
        (1, 3, 1, 1, "exact")]
    hits = overlaps(rows[:2], rows[2:], threshold=0.85)
    assert [(x.record, x.duplicate_of_record, x.kind) for x in hits] == [(3, 1, "exact")]
