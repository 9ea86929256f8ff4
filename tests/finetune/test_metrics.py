"""The task metrics and the canary bookkeeping of finetune.evaluate (no model needed)."""

import json

import pytest

from finetune.evaluate import (find_canary_manifest, load_canaries, read_conversations, rouge_l, split_last_answer,
                               text_tokens, token_f1)
from finetune.errors import FinetuneError


def test_cjk_characters_are_tokens_and_latin_words_are_lowercased():
    assert text_tokens("退款 5 个工作日 Refund, OK") == ["退", "款", "5", "个", "工", "作", "日", "refund", "ok"]


def test_token_f1_is_one_for_identical_text_and_partial_for_overlap():
    assert token_f1("The order ships today", "the order ships today") == 1.0
    assert token_f1("the order ships", "the order ships today") == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert token_f1("nothing alike", "the order ships today") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0


def test_rouge_l_rewards_order_and_scores_chinese_by_character():
    assert rouge_l("a b c d", "a b c d") == 1.0
    assert rouge_l("d c b a", "a b c d") == pytest.approx(0.25)
    assert rouge_l("退款五个工作日到账", "退款将在五个工作日内到账") == pytest.approx(2 * 1 * 0.75 / 1.75)


def test_split_last_answer_takes_the_last_non_empty_assistant_turn():
    msgs = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    prompt, answer = split_last_answer(msgs)
    assert answer == "a2" and prompt == msgs[:3]
    assert split_last_answer([{"role": "user", "content": "q"}]) is None


def test_canaries_come_from_the_sidecar_manifest_beside_the_data(tmp_path):
    data = tmp_path / "conversations.jsonl"
    data.write_text("")
    assert find_canary_manifest(data) is None
    (tmp_path / "manifest.json").write_text(json.dumps({"canaries": [{"canary": "CANARY-ABCDE-fghijk", "line": 3}]}))
    manifest = find_canary_manifest(data)
    assert manifest == tmp_path / "manifest.json"
    assert load_canaries(manifest) == ["CANARY-ABCDE-fghijk"]


def test_a_prepared_file_with_a_broken_row_names_the_line(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"nope": 1}\n')
    with pytest.raises(FinetuneError, match=r"val.jsonl:2") as err:
        read_conversations(path)
    assert err.value.code == "invalid_prepared_data"
