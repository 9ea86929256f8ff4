"""Export: the manifest's lineage names the data, and serving's registry accepts what finetune publishes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune.export import ExportRefused, export_adapter, record_gate
from serving.adapters import AdapterRegistry, servability_problems
from serving.store import ModelStore
from sovereign.formats import AdapterManifest, sha256_file

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def lora(make_lora):
    return make_lora(rank=8, seed=5)


def _export(lora, home, prepared, **kw):
    return export_adapter(lora, name=kw.pop("name", "support"), base_model=MODEL, prepared_dir=prepared,
                          config={"name": "support", "lora": {"r": 8}}, seed=7, metrics={"val_loss": 1.25},
                          home=home, origin={"kind": "finetune_job", "job_id": "ftjob-test"}, **kw)


def test_export_writes_a_manifest_whose_lineage_names_data_hashes_and_serving_accepts_it(lora, scratch_home,
                                                                                          tmp_path, held_out,
                                                                                          make_prepared):
    prepared = make_prepared(tmp_path / "prepared", held_out * 3, held_out[:2])
    adapter = _export(lora, scratch_home, prepared)
    assert adapter.served_name == "support@v1"

    manifest = AdapterManifest.read(adapter.path / "adapter.json")
    data = manifest.lineage["data"]
    assert data["files"]["train.jsonl"] == {"sha256": sha256_file(prepared / "train.jsonl"),
                                            "bytes": (prepared / "train.jsonl").stat().st_size, "rows": 12}
    assert data["files"]["val.jsonl"]["rows"] == 2
    assert data["prepare_report"]["scrub"] == {"replaced": {"PHONE": 2}}
    assert data["prepare_report_sha256"] == sha256_file(prepared / "prepare_report.json")
    base = ModelStore(scratch_home.models_dir).get(MODEL)
    assert manifest.base_manifest_sha256 == base.canonical_sha256()
    assert manifest.lineage["base_model"]["manifest_sha256"] == base.canonical_sha256()
    assert manifest.base_content_sha256 == manifest.lineage["base_model"]["content_sha256"] == base.content_sha256()
    assert manifest.lineage["seed"] == 7 and manifest.lineage["config"]["lora"] == {"r": 8}
    assert {"torch", "transformers", "peft"} <= set(manifest.lineage["library_versions"])
    assert manifest.metrics == {"val_loss": 1.25} and manifest.origin["job_id"] == "ftjob-test"

    # Serving's side of the contract: the registry lists it and would hand it to vLLM.
    registry = AdapterRegistry(scratch_home.adapters_dir)
    listed = registry.get("support")
    assert listed.served_name == "support@v1"
    assert servability_problems(listed.path, listed.manifest, base, max_lora_rank=16) == []
    assert {f.path for f in listed.manifest.files} >= {"adapter_config.json", "adapter_model.safetensors"}

    # The gate's findings land in the lineage without touching anything else.
    updated = record_gate(adapter, {"passed": True, "checks": []})
    assert updated.lineage["gate"]["passed"] is True and updated.lineage["data"] == data
    assert _export(lora, scratch_home, prepared).served_name == "support@v2"


@pytest.mark.parametrize("edit, reason", [
    ({"use_dora": True}, "DoRA"),
    ({"r": 32}, "exceeds the serving profile's max_lora_rank 16"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_adapters_vllm_cannot_serve_are_refused_before_anything_is_published(lora, scratch_home, tmp_path, held_out,
                                                                            make_prepared, edit, reason):
    bad = tmp_path / "bad"
    shutil.copytree(lora, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg.update(edit)
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportRefused, match=reason) as err:
        _export(bad, scratch_home, make_prepared(tmp_path / "prepared", held_out, held_out[:1]))
    assert err.value.code == "adapter_unservable"
    assert AdapterRegistry(scratch_home.adapters_dir).list() == []


def test_diverged_weights_are_refused(lora, scratch_home, tmp_path, held_out, make_prepared):
    bad = tmp_path / "nan"
    shutil.copytree(lora, bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(ExportRefused, match="NaN"):
        _export(bad, scratch_home, make_prepared(tmp_path / "prepared", held_out, held_out[:1]))


def test_lineage_without_training_data_is_refused(lora, scratch_home, tmp_path):
    with pytest.raises(ExportRefused, match="no train.jsonl") as err:
        _export(lora, scratch_home, tmp_path)
    assert err.value.code == "lineage_incomplete"
