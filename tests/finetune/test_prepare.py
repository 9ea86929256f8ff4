"""`prepare` end to end with the default model's tokenizer: refusals with lines and codes, no PII on disk after
scrubbing, duplicates gone, and no conversation in both train and validation."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from tests.conftest import DEFAULT_MODEL, run_sovereign
from finetune.dedup import exact_key
from finetune.errors import FinetuneError
from finetune.intake import Row
from finetune.masking import ChatEncoder
from finetune.prepare import PrepareOptions, prepare, split_key
from finetune.problems import DataInvalid
from finetune.sample_data import BROKEN_FILE, MAIN_FILE, SHAREGPT_FILE, generate


@pytest.fixture(scope="module")
def models_dir(sovereign_home):
    return sovereign_home / "models"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    return out, generate(out, conversations=400, seed=11)


@pytest.fixture(scope="module")
def prepared(sample, models_dir, tmp_path_factory):
    data, manifest = sample
    out = tmp_path_factory.mktemp("prepared") / "out"
    report = prepare(data / MAIN_FILE, out, model=DEFAULT_MODEL, models_dir=models_dir)
    return out, report


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _forms(value: str) -> set[str]:
    """The value as written and without separators: a half-redacted number must not pass either."""
    return {value.lower(), re.sub(r"[\s\-()+]", "", value).lower()}


def test_planted_pii_is_absent_from_every_file_written(sample, prepared):
    _, manifest = sample
    out, report = prepared
    files = sorted(out.iterdir())
    assert {p.name for p in files} == {"train.jsonl", "val.jsonl", "prepare_report.json"}
    texts = {p.name: p.read_text(encoding="utf-8").lower() for p in files}
    leaks = [(name, p["kind"]) for p in manifest["pii"] for name, text in texts.items()
             if any(form in text for form in _forms(p["value"]))]
    assert leaks == []
    for kind in ("phone", "id_number", "bank_card", "email", "address"):
        assert report.scrub.counts[kind] > 0
        assert f"[{kind}]" in texts["train.jsonl"] + texts["val.jsonl"]


def test_report_records_inputs_stages_and_outputs(sample, prepared):
    data, _ = sample
    out, report = prepared
    on_disk = json.loads((out / "prepare_report.json").read_text())
    assert on_disk["status"] == "succeeded"
    assert on_disk["inputs"][0]["sha256"] == __import__("hashlib").sha256((data / MAIN_FILE).read_bytes()).hexdigest()
    stages = on_disk["stages"]
    assert stages["read"] == 400 and stages["train"] + stages["val"] == stages["deduplicated"]
    assert list(stages) == ["read", "valid_structure", "valid_tokens", "deduplicated", "train", "val"]
    for name in ("train.jsonl", "val.jsonl"):
        entry = on_disk["outputs"][name]
        assert entry["sha256"] == __import__("hashlib").sha256((out / name).read_bytes()).hexdigest()
        assert entry["rows"] == len(_rows(out / name))
        assert 0 < entry["trainable_tokens"] < entry["tokens"]
    assert on_disk["model_manifest_sha256"] and on_disk["chat_template_sha256"]


def test_every_planted_duplicate_is_removed_and_canaries_survive(sample, prepared):
    _, manifest = sample
    out, report = prepared
    removed = {r.line for r in report.dedup.removed}
    planted = {dup for _, dup in manifest["duplicates"]["exact"] + manifest["duplicates"]["near"]}
    assert planted <= removed
    assert report.dedup.exact_removed >= len(manifest["duplicates"]["exact"])
    kept_text = (out / "train.jsonl").read_text() + (out / "val.jsonl").read_text()
    for c in manifest["canaries"]:
        assert c["line"] not in removed
        assert c["canary"] in kept_text
    rows = _rows(out / "train.jsonl") + _rows(out / "val.jsonl")
    keys = [exact_key(r["messages"]) for r in rows]
    assert len(keys) == len(set(keys))


def test_no_conversation_is_in_both_train_and_validation(prepared):
    out, report = prepared
    train, val = _rows(out / "train.jsonl"), _rows(out / "val.jsonl")
    assert {exact_key(r["messages"]) for r in train}.isdisjoint({exact_key(r["messages"]) for r in val})
    groups = lambda rows: {split_key(Row(0, r), 0) for r in rows}  # noqa: E731
    assert groups(train).isdisjoint(groups(val))
    assert report.split["overlap_checked"] is True
    assert 0.07 < len(val) / (len(train) + len(val)) < 0.13


def test_prepare_is_deterministic(sample, prepared, models_dir, tmp_path):
    data, _ = sample
    _, first = prepared
    again = prepare(data / MAIN_FILE, tmp_path / "again", model=DEFAULT_MODEL, models_dir=models_dir)
    assert {k: v.sha256 for k, v in again.outputs.items()} == {k: v.sha256 for k, v in first.outputs.items()}


def test_broken_file_is_refused_with_exact_lines_and_codes(sample, sovereign_home, tmp_path):
    data, manifest = sample
    out = tmp_path / "out"
    proc = run_sovereign(sovereign_home, "finetune", "prepare", str(data / BROKEN_FILE), "--model", DEFAULT_MODEL,
                         "--out", str(out), check=False)
    assert proc.returncode == 2
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["status"] == "failed" and report["error"]["code"] == "invalid_training_data"
    expected = sorted((p["line"], p["code"]) for p in manifest["broken"]["problems"])
    assert sorted((p["line"], p["code"]) for p in report["problems"]) == expected
    assert sorted(p.name for p in out.iterdir()) == ["prepare_report.json"]  # nothing to train on
    table_rows = [re.sub(r"\s+", " ", row) for row in proc.stderr.splitlines() if "│" in row]
    for line, code in expected:  # the rich table shows each problem with its line and whole code
        assert any(f"│ {line} │ {code} " in row for row in table_rows), (line, code)


def test_drop_policy_leaves_bad_rows_out_and_lists_each(sample, models_dir, tmp_path):
    data, manifest = sample
    report = prepare(data / BROKEN_FILE, tmp_path / "out", model=DEFAULT_MODEL, models_dir=models_dir,
                     options=PrepareOptions(on_invalid="drop"))
    expected = {p["line"] for p in manifest["broken"]["problems"]}
    assert {d["line"] for d in report.dropped} == expected
    assert report.stages["valid_tokens"] == report.stages["read"] - len(expected)
    assert report.outputs["train.jsonl"].rows + report.outputs["val.jsonl"].rows == report.stages["deduplicated"]


def test_too_long_is_counted_with_the_models_tokenizer(models_dir, tmp_path):
    messages = [{"role": "user", "content": "Where is my order NW-AB12345?"},
                {"role": "assistant", "content": "It left the warehouse today and arrives in 3 days."}]
    n = len(ChatEncoder.from_model_dir(models_dir / DEFAULT_MODEL).encode(messages).input_ids)
    path = tmp_path / "one.jsonl"
    other = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    path.write_text(json.dumps({"messages": other}) + "\n" + json.dumps({"messages": messages}) + "\n")
    ok = prepare(path, tmp_path / "ok", model=DEFAULT_MODEL, models_dir=models_dir,
                 options=PrepareOptions(max_seq_len=n, validation_fraction=0.5))
    assert ok.problems == []
    with pytest.raises(DataInvalid) as err:
        prepare(path, tmp_path / "short", model=DEFAULT_MODEL, models_dir=models_dir,
                options=PrepareOptions(max_seq_len=n - 1, validation_fraction=0.5))
    assert [(p.line, p.code) for p in err.value.problems] == [(2, "too_long")]


def test_template_render_error_comes_from_the_models_own_template(models_dir, tmp_path):
    strict = tmp_path / "models" / "strict"
    shutil.copytree(models_dir / DEFAULT_MODEL, strict, ignore=shutil.ignore_patterns("*.safetensors"))
    template = (strict / "chat_template.jinja").read_text()
    (strict / "chat_template.jinja").write_text(
        "{% if messages | length > 3 %}{{ raise_exception('at most one exchange') }}{% endif %}" + template)
    path = tmp_path / "d.jsonl"
    short = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    longer = short + [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (short, longer, short[:1] + [
        {"role": "assistant", "content": "e"}])))
    with pytest.raises(DataInvalid) as err:
        prepare(path, tmp_path / "out", model="strict", models_dir=tmp_path / "models")
    assert [(p.line, p.code) for p in err.value.problems] == [(2, "template_render_error")]


def test_validation_file_overlapping_train_is_refused_with_its_lines(sample, models_dir, tmp_path):
    data, _ = sample
    lines = (data / MAIN_FILE).read_text(encoding="utf-8").splitlines()
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("\n".join(lines[:80]) + "\n", encoding="utf-8")
    val.write_text("\n".join([lines[100], lines[5], lines[101], lines[7]]) + "\n", encoding="utf-8")
    with pytest.raises(DataInvalid) as err:
        prepare(train, tmp_path / "out", model=DEFAULT_MODEL, models_dir=models_dir, validation_path=val)
    hits = [(p.file, p.line, p.code) for p in err.value.problems]
    assert hits == [("val.jsonl", 2, "train_val_overlap"), ("val.jsonl", 4, "train_val_overlap")]
    report = prepare(train, tmp_path / "out", model=DEFAULT_MODEL, models_dir=models_dir, validation_path=val,
                     options=PrepareOptions(on_invalid="drop"))
    assert report.outputs["val.jsonl"].rows == 2


def test_output_folder_with_other_files_is_never_replaced(sample, models_dir, tmp_path):
    data, _ = sample
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FinetuneError) as err:
        prepare(data / SHAREGPT_FILE, out, model=DEFAULT_MODEL, models_dir=models_dir)
    assert err.value.code == "output_exists"
    assert (out / "notes.txt").read_text() == "keep me"


def test_cli_prepares_a_sharegpt_export_and_prints_no_pii(sample, sovereign_home, tmp_path):
    data, manifest = sample
    out = tmp_path / "out"
    proc = run_sovereign(sovereign_home, "finetune", "prepare", str(data / SHAREGPT_FILE), "--out", str(out),
                         "--json")
    report = json.loads(proc.stdout)
    assert report["inputs"][0]["format"] == "sharegpt" and report["status"] == "succeeded"
    assert (out / "train.jsonl").is_file() and (out / "val.jsonl").is_file()
    shown = (proc.stdout + proc.stderr).lower()
    assert not [p["value"] for p in manifest["pii"] if any(f in shown for f in _forms(p["value"]))]


def test_cli_takes_a_finetune_config_and_uses_its_data_section(sample, sovereign_home, tmp_path):
    data, manifest = sample
    lines = (data / MAIN_FILE).read_text(encoding="utf-8").splitlines()[:40]
    (tmp_path / "export.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = tmp_path / "cs.yaml"
    cfg.write_text(f"name: cs-test\nmodel: {DEFAULT_MODEL}\ndata:\n  train_file: {tmp_path / 'export.jsonl'}\n"
                   f"  prepared_dir: {tmp_path / 'prepared'}\n  validation_fraction: 0.25\n  seed: 3\n"
                   "training:\n  max_seq_len: 512\n  micro_batch_tokens: 1024\n")
    run_sovereign(sovereign_home, "finetune", "prepare", str(cfg))
    report = json.loads((tmp_path / "prepared" / "prepare_report.json").read_text())
    assert report["options"]["max_seq_len"] == 512 and report["options"]["seed"] == 3
    want = round(0.25 * report["stages"]["deduplicated"])
    assert want <= report["outputs"]["val.jsonl"]["rows"] <= want + 2  # whole groups go to val


def test_a_headerless_csv_is_refused_without_writing_its_first_row_anywhere(models_dir, tmp_path):
    pii = ("Alice Zhang", "alice.zhang@example.com", "13812345678", "4111 1111 1111 1111")
    path = tmp_path / "export.csv"
    path.write_text(f"{pii[0]} {pii[1]} {pii[2]},My card {pii[3]} was charged twice\nBob,hello\n", encoding="utf-8")
    with pytest.raises(DataInvalid) as err:
        prepare(path, tmp_path / "out", model=DEFAULT_MODEL, models_dir=models_dir)
    assert [(p.line, p.code) for p in err.value.problems] == [(1, "csv_missing_columns")]
    written = (tmp_path / "out" / "prepare_report.json").read_text(encoding="utf-8")
    shown = written + str(err.value) + " ".join(p.message for p in err.value.problems)
    assert [v for v in pii if any(form in shown.lower() for form in _forms(v))] == []
    assert json.loads(written)["problems"][0]["code"] == "csv_missing_columns"


@pytest.mark.parametrize("dedup", [True, False])
def test_a_compact_json_array_prepares_and_splits_like_any_file(models_dir, tmp_path, dedup):
    topics = ["refund for a broken kettle", "delivery time to Oslo", "change my password", "opening hours on Sunday",
              "warranty of the Summit backpack", "pay with an invoice"]
    convs = [{"messages": [{"role": "user", "content": f"Hello, I have a question about {t}."},
                           {"role": "assistant", "content": f"Of course. Regarding {t}, here is what you need."}]}
             for t in topics]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(convs + [convs[0]]))  # one line, with one exact repeat
    report = prepare(path, tmp_path / "out", model=DEFAULT_MODEL, models_dir=models_dir,
                     options=PrepareOptions(dedup=dedup, validation_fraction=0.34))
    train, val = _rows(tmp_path / "out" / "train.jsonl"), _rows(tmp_path / "out" / "val.jsonl")
    assert len(train) + len(val) == (6 if dedup else 7) and len(val) >= 2 and len(train) >= 4
    assert report.outputs["train.jsonl"].tokens > 0 and report.outputs["val.jsonl"].tokens > 0
    if dedup:
        assert [(r.line, r.record, r.duplicate_of_record, r.kind) for r in report.dedup.removed] == [
            (1, 7, 1, "exact")]


def test_refuse_pii_names_the_lines_and_kinds_never_the_values_and_writes_nothing(models_dir, tmp_path):
    # A gateway job of a team whose policy is pii=block: its data is refused, not scrubbed into a model.
    rows = [{"messages": [{"role": "user", "content": "Where is my order?"},
                          {"role": "assistant", "content": "It ships today."}]},
            {"messages": [{"role": "user", "content": "Call me on 13812345678 please."},
                          {"role": "assistant", "content": "Will do."}]},
            {"messages": [{"role": "user", "content": "Mail li.lei@example.com"},
                          {"role": "assistant", "content": "Sent."}]}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows * 4), encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(DataInvalid) as err:
        prepare(src, out, model=DEFAULT_MODEL, models_dir=models_dir,
                options=PrepareOptions(refuse_pii=True, scrub_pii=False))
    message = str(err.value)
    assert "policy blocks it" in message and "line 2: pii_found" in message and "line 3: pii_found" in message
    assert "phone 4" in message and "email 4" in message
    assert "13812345678" not in message and "li.lei" not in message
    assert [p.line for p in err.value.problems][:4] == [2, 3, 5, 6]
    assert not (out / "train.jsonl").exists()


def test_the_organisations_own_pii_kinds_are_scrubbed_and_the_rules_recorded(models_dir, tmp_path, monkeypatch):
    """The rules file the gateway loads: what pii=redact hides there is never trained on here."""
    rules = tmp_path / "pii-rules.yaml"
    rules.write_text("kinds:\n  customer_id:\n    pattern: 'CUST-[0-9]{8}'\n")
    monkeypatch.setenv("SOVEREIGN_PII_RULES", str(rules))
    asks = ["where is my parcel", "can I return the tent", "why was I charged twice", "is the jacket waterproof",
            "when do you open on Sunday", "my stove arrived broken", "can I change the delivery day",
            "do you ship to Norway", "how long is the warranty", "please cancel my subscription"]
    rows = [{"messages": [{"role": "user", "content": f"I am customer CUST-0041234{i}, {ask}?"},
                          {"role": "assistant", "content": f"Thanks, CUST-0041234{i}: {ask[::-1]}."}]}
            for i, ask in enumerate(asks)]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report = prepare(src, tmp_path / "out", model=DEFAULT_MODEL, models_dir=models_dir,
                     options=PrepareOptions(dedup=False))
    assert report.scrub.counts["customer_id"] == 20 and report.scrub.rows_changed == 10
    assert report.pii_rules.kinds == ["customer_id"] and report.pii_rules.file == str(rules)
    written = "".join(p.read_text(encoding="utf-8") for p in (tmp_path / "out").iterdir())
    assert "CUST-0041234" not in written and "[CUSTOMER_ID]" in written
    rules.write_text("kinds:\n  customer_id:\n    pattern: '[0-9]*'\n")
    with pytest.raises(FinetuneError) as err:
        prepare(src, tmp_path / "out2", model=DEFAULT_MODEL, models_dir=models_dir)
    assert err.value.code == "pii_rules_invalid" and "matches the empty string" in str(err.value)
    assert not (tmp_path / "out2" / "train.jsonl").exists()
