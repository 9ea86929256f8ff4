"""Intake and structural validation: converters agree with the canonical file; problems carry line and code."""

from __future__ import annotations

import json

import pytest

from finetune.intake import detect_format, read_file
from finetune.sample_data import ALPACA_FILE, CSV_FILE, MAIN_FILE, SHAREGPT_FILE, generate
from finetune.validate import check_structure, validate_structure


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    return out, generate(out, conversations=300, seed=1, slice_size=120)


def _canonical_slice(out, n):
    return [json.loads(line)["messages"] for line in (out / MAIN_FILE).read_text().splitlines()[:n]]


@pytest.mark.parametrize("name, fmt", [(SHAREGPT_FILE, "sharegpt"), (ALPACA_FILE, "alpaca"), (CSV_FILE, "csv")])
def test_each_converter_reproduces_the_canonical_conversations(sample, name, fmt):
    out, manifest = sample
    intake = read_file(out / name)
    assert intake.format == fmt and intake.problems == []
    expected = _canonical_slice(out, manifest["slice"]["first_lines"])
    assert [row.data["messages"] for row in intake.rows] == expected
    assert validate_structure(intake.rows).problems == []


def test_json_array_rows_carry_the_line_each_record_starts_on(sample):
    out, _ = sample
    text = (out / SHAREGPT_FILE).read_text()
    intake = read_file(out / SHAREGPT_FILE)
    lines = text.splitlines()
    for row in intake.rows[:20]:
        assert lines[row.line - 1].strip() == "{"
    assert intake.rows[0].line == 2


def test_csv_rows_of_one_conversation_start_at_its_first_line(sample):
    out, _ = sample
    intake = read_file(out / CSV_FILE)
    lines = (out / CSV_FILE).read_text().splitlines()
    for i, row in enumerate(intake.rows[:20]):
        assert lines[row.line - 1].startswith(f"c{i + 1:05d},system,")


def test_csv_question_answer_columns_map_through_the_config(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer,persona\nWhere is my order?,It ships today.,You are polite.\n"
                    "\"Multi\nline\",Sure.,\n", encoding="utf-8")
    intake = read_file(path, "csv", {"user": "question", "assistant": "answer", "system": "persona"})
    assert [r.line for r in intake.rows] == [2, 3]
    assert intake.rows[0].data["messages"] == [{"role": "system", "content": "You are polite."},
                                               {"role": "user", "content": "Where is my order?"},
                                               {"role": "assistant", "content": "It ships today."}]
    assert intake.rows[1].data["messages"][0] == {"role": "user", "content": "Multi\nline"}


def test_csv_without_mapped_columns_names_what_is_missing(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("a,b\n1,2\n", encoding="utf-8")
    intake = read_file(path, "csv")
    assert [(p.line, p.code) for p in intake.problems] == [(1, "csv_missing_columns")]
    assert "conversation_id" in intake.problems[0].message


def test_broken_rows_structural_problems_have_exact_lines_and_codes(sample):
    out, manifest = sample
    intake = read_file(out / "broken.jsonl")
    found = sorted([(p.line, p.code) for p in intake.problems + validate_structure(intake.rows).problems])
    token_level = {"too_long", "no_trainable_tokens"}  # need the model's tokenizer: see test_prepare
    expected = sorted((p["line"], p["code"]) for p in manifest["broken"]["problems"] if p["code"] not in token_level)
    assert found == expected


@pytest.mark.parametrize("data, code", [
    ([1, 2], "data_type"),
    ({"messages": "hi"}, "missing_messages_list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "example_missing_assistant_message"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unrecognized_role"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]},
     "invalid_weight"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}, "missing_content"),
    ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "y"}]}, "missing_content"),
])
def test_structure_codes(data, code):
    assert code in [c for c, _ in check_structure(data)]


def test_well_formed_rows_pass_including_weights_and_text_parts():
    ok = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "q"}]},
                       {"role": "assistant", "content": "a", "weight": 0}, {"role": "user", "content": "q2"},
                       {"role": "assistant", "content": "a2", "weight": 1}]}
    assert check_structure(ok) == []


def test_format_detection(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n')
    assert detect_format(p, p.read_text()) == "alpaca"
    p.write_text('\n{"conversations": []}\n')
    assert detect_format(p, p.read_text()) == "sharegpt"
    p.write_text('{"messages": []}\n')
    assert detect_format(p, p.read_text()) == "openai"


def test_invalid_utf8_and_empty_files_are_problems_not_crashes(tmp_path):
    p = tmp_path / "enc.jsonl"
    p.write_bytes(b'{"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "ok"}]}\n'
                  b'{"messages": "\xff\xfe"}\n')
    intake = read_file(p)
    assert [(x.line, x.code) for x in intake.problems] == [(2, "invalid_encoding")]
    assert len(intake.rows) == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert [x.code for x in read_file(empty).problems] == ["empty_file"]


def test_a_json_array_cut_short_is_fatal_whatever_the_policy(tmp_path):
    p = tmp_path / "cut.json"
    p.write_text('[\n {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},\n'
                 ' {"conversations": [{"from": "human", "value": "x"}\n')
    intake = read_file(p)
    assert intake.fatal and [(x.line, x.code) for x in intake.problems] == [(4, "invalid_json")]
    assert len(intake.rows) == 1
