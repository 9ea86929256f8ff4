"""The job runner's record keeping, without a model: statuses, OpenAI error objects, events, config mapping."""

from __future__ import annotations

import json

import pytest

from finetune.jobs import EventLog, JobError, JobRunner, RunnerSettings, config_for_job
from sovereign.formats import JobRecord
from sovereign.settings import HomeSettings

EVENT_KEYS = {"id", "created_at", "level", "message", "type", "data"}


def _job(home: HomeSettings, **fields) -> JobRecord:
    record = JobRecord(id=fields.pop("id", "ftjob-unit"), model="SmolLM2-135M-Instruct",
                       training_file=fields.pop("training_file", "file-missing"), **fields)
    record.write(home.jobs_dir / record.id / "job.json")
    return record


def test_a_job_whose_training_file_is_missing_fails_with_an_openai_error_and_events(tmp_path):
    home = HomeSettings(home=tmp_path)
    record = _job(home, status="queued")
    job_dir = home.jobs_dir / record.id
    final = JobRunner(job_dir, home=home, settings=RunnerSettings.load(None)).run()
    assert final.status == "failed"
    assert final.error["code"] == "invalid_file" and final.error["param"] == "training_file"
    assert "file-missing" in final.error["message"]
    assert final.started_at is not None and final.finished_at is not None
    assert JobRecord.read(job_dir / "job.json").status == "failed"  # what the gateway reads
    events = EventLog(job_dir / "events.jsonl").read()
    assert [e["message"] for e in events][0] == "Fine-tuning job started"
    assert events[-1]["level"] == "error" and events[-1]["data"]["code"] == "invalid_file"
    for e in events:
        assert set(e) == EVENT_KEYS and isinstance(e["created_at"], int) and e["id"].startswith("ftevent-")
    assert len({e["id"] for e in events}) == len(events)


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_a_finished_job_is_not_run_again(tmp_path, status):
    home = HomeSettings(home=tmp_path)
    record = _job(home, status=status)
    with pytest.raises(JobError) as err:
        JobRunner(home.jobs_dir / record.id, home=home).run()
    assert err.value.code == "job_finished"


def test_a_folder_without_a_job_record_is_refused(tmp_path):
    with pytest.raises(JobError) as err:
        JobRunner(tmp_path, home=HomeSettings(home=tmp_path)).run()
    assert err.value.code == "job_not_found"


def test_openai_hyperparameters_and_suffix_go_on_top_of_the_preset(tmp_path):
    home = HomeSettings(home=tmp_path)
    uploaded = home.files_dir / "file-abc.jsonl"
    uploaded.parent.mkdir(parents=True)
    uploaded.write_text("{}\n")
    record = JobRecord(id="ftjob-1", model="SmolLM2-135M-Instruct", training_file="file-abc", suffix="Support Bot!",
                       seed=9, hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 0.5, "batch_size": "auto"},
                       config="ci-smoke")
    cfg = config_for_job(record, RunnerSettings.load(None), home.files_dir)
    assert cfg.name == "support-bot" and cfg.model == "SmolLM2-135M-Instruct"
    assert cfg.data.train_file == uploaded and cfg.data.prepared_dir is None
    assert cfg.training.epochs == 2 and cfg.training.seed == 9
    assert cfg.training.learning_rate == pytest.approx(1e-3 * 0.5)  # ci-smoke's 1e-3 times the multiplier
    assert cfg.training.batch_size is None  # "auto": the preset's token-budget steps

    sized = record.model_copy(update={"hyperparameters": {"batch_size": 8}})
    assert config_for_job(sized, RunnerSettings.load(None), home.files_dir).training.batch_size == 8

    newer = JobRecord(id="ftjob-2", model="SmolLM2-135M-Instruct", training_file=str(uploaded), config="ci-smoke",
                      method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}})
    assert config_for_job(newer, RunnerSettings.load(None), home.files_dir).training.epochs == 3


@pytest.mark.parametrize("team_pii,scrub,refuse", [("off", False, False), ("redact", True, False),
                                                   ("block", True, True), (None, False, False)])
def test_the_creating_teams_pii_policy_outranks_a_preset_that_keeps_pii(tmp_path, team_pii, scrub, refuse):
    home = HomeSettings(home=tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    preset = tmp_path / "keeps-pii.yaml"
    preset.write_text("model: SmolLM2-135M-Instruct\nname: x\ndata:\n  scrub_pii: false\n")
    record = JobRecord(id="ftjob-3", model="SmolLM2-135M-Instruct", training_file=str(data), config=str(preset),
                       **({"team_pii": team_pii} if team_pii else {}))
    cfg = config_for_job(record, RunnerSettings.load(None), home.files_dir)
    assert (cfg.data.scrub_pii, cfg.data.refuse_pii) == (scrub, refuse)


def test_hyperparameters_that_make_no_valid_config_fail_the_job_naming_them(tmp_path):
    home = HomeSettings(home=tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    record = _job(home, status="queued", training_file=str(data), hyperparameters={"n_epochs": 0}, config="ci-smoke")
    final = JobRunner(home.jobs_dir / record.id, home=home).run()
    assert final.status == "failed" and final.error["code"] == "invalid_hyperparameters"
    assert final.error["param"] == "hyperparameters" and "epochs" in final.error["message"]


def test_event_log_appends_whole_json_lines(tmp_path):
    log = EventLog(tmp_path / "events.jsonl")
    log("info", "metrics", "Step 1/12: training loss=2.10", {"step": 1, "train_loss": 2.1})
    log("warn", "message", "說明 ünïcode", {})
    lines = (tmp_path / "events.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["message"] == "說明 ünïcode"
    assert json.loads(lines[0])["data"] == {"step": 1, "train_loss": 2.1}


def _sigterm_run(home, cancel_first: bool):
    import os
    import signal
    import time

    from finetune import jobs
    from finetune.config import FinetuneConfig

    job = jobs.create_local_job(FinetuneConfig.load(None, name="x", data={"prepared_dir": "/nonexistent"}), None, home)

    def run(pipeline):
        (pipeline.work_dir / "checkpoints" / "4").mkdir(parents=True)
        if cancel_first:  # what the gateway does: the record first, then SIGTERM to the worker
            record = JobRecord.read(job / "job.json")
            record.model_copy(update={"status": "cancelled"}).write(job / "job.json")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    original = jobs.Pipeline.run
    jobs.Pipeline.run = run
    try:
        return job, JobRunner(job, home=home).run()
    finally:
        jobs.Pipeline.run = original


def test_a_sigterm_without_a_cancel_leaves_the_job_resumable(tmp_path):
    # A drained node or an evicted pod: Kubernetes reruns the Job's pod, which must resume from the checkpoints.
    home = HomeSettings(home=tmp_path)
    job, record = _sigterm_run(home, cancel_first=False)
    assert record.status == "running"
    events = (job / "events.jsonl").read_text()
    assert "interrupted (SIGTERM): checkpoints kept" in events
    assert (job / "checkpoints" / "4").is_dir()
    again = JobRunner(job, home=home).run()  # not refused as finished: it runs (and fails here on the bogus data)
    assert again.status == "failed" and "Fine-tuning job resumed" in (job / "events.jsonl").read_text()


def test_a_sigterm_after_the_gateways_cancel_is_a_cancel(tmp_path):
    job, record = _sigterm_run(HomeSettings(home=tmp_path), cancel_first=True)
    assert record.status == "cancelled"


def test_prepared_data_is_reused_only_when_made_with_this_configs_settings(tmp_path):
    import json

    from finetune.config import FinetuneConfig
    from finetune.jobs import Pipeline
    from finetune.prepare import PrepareOptions
    from sovereign.formats import sha256_file

    raw = tmp_path / "raw.jsonl"
    raw.write_text('{"messages":[{"role":"user","content":"call 13800138000"},{"role":"assistant","content":"ok"}]}\n')
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for name in ("train.jsonl", "val.jsonl"):
        (prepared / name).write_text(raw.read_text())
    cfg = FinetuneConfig.load(None, name="x", data={"train_file": str(raw), "prepared_dir": str(prepared)})
    pipeline = Pipeline(cfg, tmp_path, settings=RunnerSettings(), home=HomeSettings(home=tmp_path),
                        emit=lambda *a: None, origin={})

    def made_with(**changes):
        options = PrepareOptions.from_config(cfg).model_dump(mode="json")
        report = {"status": "succeeded", "model": cfg.model, "options": options,
                  "inputs": [{"role": "train", "sha256": sha256_file(raw)}]}
        for key, value in changes.items():
            (report["options"] if key in options else report)[key] = value
        (prepared / "prepare_report.json").write_text(json.dumps(report))
        return pipeline._prepared_is_current(prepared)

    assert made_with()
    assert not made_with(scrub_pii=False)  # the phone number would be trained on
    assert not made_with(max_seq_len=8192)
    assert not made_with(model="another-model")
    assert not made_with(inputs=[{"role": "train", "sha256": sha256_file(raw)}, {"role": "validation", "sha256": "x"}])
    # Scrubbed before the organisation's PII rules said what else to hide (or under other rules): made again.
    rules = tmp_path / "pii-rules.yaml"
    rules.write_text("kinds: {customer_id: {pattern: 'CUST-[0-9]{8}'}}\n")
    scrubbed = {"scrub": {"enabled": True}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOVEREIGN_PII_RULES", str(rules))
        assert not made_with(**scrubbed, pii_rules=None)
        assert made_with(**scrubbed, pii_rules={"sha256": sha256_file(rules)})
        assert made_with(scrub={"enabled": False}, pii_rules=None)  # nothing was scrubbed: no rule applies


def test_a_local_job_names_a_missing_data_file_before_it_exists_and_keeps_absolute_paths(tmp_path, monkeypatch):
    from finetune import jobs
    from finetune.config import FinetuneConfig
    from finetune.errors import FinetuneError

    home = HomeSettings(home=tmp_path / "home")
    monkeypatch.chdir(tmp_path)
    missing = FinetuneConfig.load(None, name="x", data={"train_file": "data/nope.jsonl"})
    refusal = f"data/nope.jsonl: no such file .*read from {tmp_path}; .*sample-data"
    with pytest.raises(FinetuneError, match=refusal) as err:
        jobs.create_local_job(missing, None, home)
    assert err.value.code == "file_not_found" and not home.jobs_dir.exists()  # no failed job left to clean up
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "chats.jsonl").write_text("{}\n")
    there = FinetuneConfig.load(None, name="x", data={"train_file": "data/chats.jsonl"})
    job = jobs.create_local_job(there, None, home)
    record = JobRecord.read(job / "job.json")
    assert record.training_file == str(tmp_path / "data" / "chats.jsonl")  # runnable, and readable, from anywhere
    assert record.config["data"]["train_file"] == str(tmp_path / "data" / "chats.jsonl")
