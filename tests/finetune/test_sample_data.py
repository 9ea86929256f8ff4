"""The sample-data generator: byte-identical for a seed, valid planted PII, a manifest that tells the truth."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_sovereign
from finetune.sample_data import BROKEN_FILE, MAIN_FILE, generate
from sovereign.pii import bank_card_valid, id_number_valid


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    return out, generate(out, conversations=600, seed=7)


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_same_seed_gives_byte_identical_files(sample, tmp_path):
    out, manifest = sample
    again = generate(tmp_path / "again", conversations=600, seed=7)
    assert again == manifest
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_another_seed_gives_other_data(sample, tmp_path):
    out, _ = sample
    generate(tmp_path / "other", conversations=600, seed=8)
    assert (out / MAIN_FILE).read_bytes() != (tmp_path / "other" / MAIN_FILE).read_bytes()


def test_main_file_is_valid_multi_turn_chat_in_both_languages(sample):
    out, manifest = sample
    rows = _rows(out / MAIN_FILE)
    assert len(rows) == manifest["conversations"] == 600
    assert all(r["messages"][0]["role"] == "system" for r in rows)
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert sum(len(r["messages"]) >= 5 for r in rows) > 100  # multi-turn is common
    zh = sum(any("\u4e00" <= ch <= "\u9fff" for ch in r["messages"][1]["content"]) for r in rows)
    assert 0.3 < zh / len(rows) < 0.7
    text = (out / MAIN_FILE).read_text(encoding="utf-8")
    for topic in ("refund", "warranty", "human agent", "quote", "退款", "保修", "人工", "报价"):
        assert topic in text


def test_planted_pii_is_valid_and_where_the_manifest_says(sample):
    out, manifest = sample
    rows = _rows(out / MAIN_FILE)
    kinds = {p["kind"] for p in manifest["pii"]}
    assert kinds == {"phone", "id_number", "bank_card", "email", "address"}
    for p in manifest["pii"]:
        assert p["lines"], p
        for line in p["lines"]:
            assert p["value"] in json.dumps(rows[line - 1], ensure_ascii=False)
        if p["kind"] == "id_number":
            assert id_number_valid(p["value"])
        if p["kind"] == "bank_card":
            assert bank_card_valid(p["value"].replace(" ", ""))


def test_duplicates_and_canaries_are_recorded(sample):
    out, manifest = sample
    rows = _rows(out / MAIN_FILE)
    for original, dup in manifest["duplicates"]["exact"]:
        assert original < dup
        a, b = rows[original - 1]["messages"], rows[dup - 1]["messages"]
        assert [" ".join(m["content"].split()) for m in a] == [" ".join(m["content"].split()) for m in b]
    for original, dup in manifest["duplicates"]["near"]:
        assert original < dup and rows[original - 1] != rows[dup - 1]
    assert len(manifest["canaries"]) == 8
    for c in manifest["canaries"]:
        msgs = rows[c["line"] - 1]["messages"]
        assert c["canary"] in msgs[c["message_index"]]["content"]
        assert msgs[: c["message_index"]] == c["prompt_messages"]


def test_broken_file_lists_one_row_per_problem_code(sample):
    out, manifest = sample
    expected = manifest["broken"]["problems"]
    assert manifest["broken"]["file"] == BROKEN_FILE
    assert {p["code"] for p in expected} >= {"invalid_json", "missing_messages_list", "unrecognized_role",
                                             "missing_content", "example_missing_assistant_message", "too_long",
                                             "no_trainable_tokens"}
    lines = (out / BROKEN_FILE).read_text(encoding="utf-8").splitlines()
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[next(p["line"] for p in expected if p["code"] == "invalid_json") - 1])


def test_cli_writes_the_sample_set(tmp_path):
    proc = run_sovereign(tmp_path, "finetune", "sample-data", str(tmp_path / "data"), "--conversations", "100",
                         "--seed", "3")
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["conversations"] == 100 and manifest["seed"] == 3
    assert "planted PII" in proc.stderr
