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
    token_level = {"too_long", "no_trainable_tokens", "template_lacks_tools"}  # need the model: see test_prepare
    expected = sorted((p["line"], p["code"]) for p in manifest["broken"]["problems"] if p["code"] not in token_level)
    assert found == expected


@pytest.mark.parametrize("data, code", [
    ([1, 2], "data_type"),
    ({"messages": "hi"}, "missing_messages_list"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "example_missing_assistant_message"),
    ({"messages": [{"role": "agent", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unrecognized_role"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "tool_result_without_call"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "function_call": {
        "name": "f", "arguments": "{}"}}, {"role": "assistant", "content": "y"}]}, "legacy_function_call"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"id": "c", "type":
        "function", "function": {"name": "f", "arguments": "{not json"}}]}]}, "invalid_tool_call"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": []}]}, "invalid_tool_call"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "{}"}}]}, {"role": "assistant", "content": "y"}]}, "invalid_tool_call"),
    ({"tools": [{"type": "function", "function": {"name": "g"}}], "messages": [
        {"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                                               "function": {"name": "f",
                                                                                            "arguments": "{}"}}]}]},
     "unknown_tool"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}], "messages": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "invalid_tools"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]},
     "invalid_weight"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}, "missing_content"),
    ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "y"}]}, "missing_content"),
])
def test_structure_codes(data, code):
    assert code in [c for c, _ in check_structure(data)]


def test_openai_tool_call_rows_are_well_formed_and_the_legacy_format_gets_one_clear_problem():
    calls = [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"order": "4417"}'}}]
    tools = [{"type": "function", "function": {"name": "lookup", "description": "Find an order",
                                               "parameters": {"type": "object", "properties": {}}}}]
    row = {"messages": [{"role": "user", "content": "Where is order 4417?"},
                        {"role": "assistant", "content": None, "tool_calls": calls},
                        {"role": "tool", "tool_call_id": "call_1", "content": "shipped"},
                        {"role": "assistant", "content": "Shipped."}]}
    assert check_structure(row) == [] and check_structure({**row, "tools": tools, "parallel_tool_calls": False}) == []
    legacy = check_structure({"messages": [{"role": "user", "content": "x"},
                                           {"role": "assistant", "content": None,
                                            "function_call": {"name": "lookup", "arguments": "{}"}},
                                           {"role": "function", "name": "lookup", "content": "shipped"},
                                           {"role": "assistant", "content": "Shipped."}]})
    assert [code for code, _ in legacy] == ["legacy_function_call"]
    assert legacy[0][1].startswith("message 1 uses OpenAI's deprecated `function_call`")


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


HEADERLESS_PII = ("Alice Zhang", "alice.zhang@example.com", "13812345678", "4111 1111 1111 1111")


def test_csv_without_a_header_row_never_quotes_its_first_row(tmp_path):
    path = tmp_path / "export.csv"
    path.write_text(f"{HEADERLESS_PII[0]} {HEADERLESS_PII[1]} {HEADERLESS_PII[2]},My card {HEADERLESS_PII[3]} was "
                    "charged twice\nBob,hello\n", encoding="utf-8")
    intake = read_file(path)
    assert [(p.line, p.code) for p in intake.problems] == [(1, "csv_missing_columns")]
    message = intake.problems[0].message
    assert not [value for value in HEADERLESS_PII + ("My card", "charged") if value in message]
    assert "2 column" in message and all(name in message for name in ("conversation_id", "role", "content"))


def _conv(i):
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def test_compact_json_array_rows_share_a_line_but_not_a_key_and_messages_name_the_record(tmp_path):
    path = tmp_path / "compact.json"
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}
    path.write_text(json.dumps([_conv(1), bad, _conv(3)]))
    intake = read_file(path)
    assert [(r.line, r.record) for r in intake.rows] == [(1, 1), (1, 2), (1, 3)]
    assert len({r.key for r in intake.rows}) == 3
    problems = validate_structure(intake.rows).problems
    assert [(p.line, p.code) for p in problems] == [(1, "missing_content")]
    assert problems[0].message.startswith("record 2 (line 1): ")


def test_data_after_the_json_array_is_a_fatal_error_with_its_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps([_conv(1), _conv(2)]) + "\n\n" + "".join(json.dumps(_conv(i)) + "\n" for i in (3, 4)))
    intake = read_file(path)
    assert intake.fatal and [(p.line, p.code) for p in intake.problems] == [(3, "invalid_json")]
    trailing_space = tmp_path / "ok.json"
    trailing_space.write_text(json.dumps([_conv(1), _conv(2)]) + "\n  \n\t\n")
    ok = read_file(trailing_space)
    assert not ok.fatal and ok.problems == [] and len(ok.rows) == 2


def test_invalid_utf8_in_a_csv_or_json_array_is_reported_with_its_line_and_fatal(tmp_path):
    csv_path = tmp_path / "enc.csv"
    csv_path.write_bytes(b"user,assistant\nq1,a1\nq2 \xff\xfe,a2\nq3,a3\n")
    array_path = tmp_path / "enc.json"
    array_path.write_bytes(b"[\n" + json.dumps(_conv(1)).encode() + b",\n" + json.dumps(_conv(2)).encode()[:-3]
                           + b"\xff\"}]},\n" + json.dumps(_conv(3)).encode() + b"\n]\n")
    for path in (csv_path, array_path):
        intake = read_file(path)
        assert intake.fatal and [(p.line, p.code) for p in intake.problems] == [(3, "invalid_encoding")], path.name


def test_malformed_alpaca_history_entries_are_flagged_not_dropped(tmp_path):
    path = tmp_path / "alpaca.jsonl"
    good = {"instruction": "hi", "output": "hello", "history": [["q", "a"]]}
    bad = {"instruction": "hi", "output": "hello", "history": [["only question"], ["q", "a"], ["q", "a", "extra"]]}
    not_a_list = {"instruction": "hi", "output": "hello", "history": 5}
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, bad, not_a_list)))
    intake = read_file(path)
    assert intake.format == "alpaca" and intake.problems == []
    found = [(p.line, p.code) for p in validate_structure(intake.rows).problems]
    assert found == [(2, "data_type"), (3, "data_type")]
