"""The adapter registry on disk: publish, list, remove, and refusal of what vLLM cannot serve."""

import json
import shutil
from datetime import datetime, timezone

import pytest

from serving.adapters import AdapterRegistry, servability_problems
from serving.errors import AdapterNotFound, AdapterRefused
from serving.store import DEFAULT_MODEL_NAME, ModelStore


@pytest.fixture(scope="module")
def base(sovereign_home):
    return ModelStore(sovereign_home / "models").get(DEFAULT_MODEL_NAME)


@pytest.fixture(scope="module")
def lora(make_lora):
    return make_lora(rank=8)


def test_publish_writes_manifest_with_base_hash_rank_and_file_digests(tmp_path, base, lora):
    reg = AdapterRegistry(tmp_path)
    a = reg.publish(lora, "support", base, max_lora_rank=16)
    assert a.served_name == "support@v1"
    on_disk = json.loads((tmp_path / "support" / "v1" / "adapter.json").read_text())
    assert on_disk["base_manifest_sha256"] == base.canonical_sha256()
    assert on_disk["rank"] == 8 and "q_proj" in on_disk["target_modules"]
    assert {f["path"] for f in on_disk["files"]} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert reg.publish(lora, "support", base).served_name == "support@v2"
    assert [x.served_name for x in reg.list(DEFAULT_MODEL_NAME)] == ["support@v1", "support@v2"]
    assert reg.get("support").served_name == "support@v2"


def test_the_newest_version_is_the_one_a_bare_name_calls_at_the_gateway(tmp_path, base, lora):
    """Named versions too: the registry and the gateway's bare-name route order them with one rule."""
    from sovereign.formats import version_order

    reg = AdapterRegistry(tmp_path)
    for version in ("v9", "rc1", "12", "v10"):
        reg.publish(lora, "support", base, version=version)
    assert reg.get("support").served_name == "support@12"
    assert reg.publish(lora, "support", base).served_name == "support@v13"  # numbered after 12: the newest
    assert reg.get("support").served_name == "support@v13"
    assert sorted(["v9", "rc1", "12", "v10", "2"], key=version_order) == ["rc1", "2", "v9", "v10", "12"]


def test_remove_one_version_or_all(tmp_path, base, lora):
    reg = AdapterRegistry(tmp_path)
    reg.publish(lora, "sales", base)
    reg.publish(lora, "sales", base)
    assert reg.remove("sales", "v1") == ["sales@v1"]
    assert [a.served_name for a in reg.list()] == ["sales@v2"]
    reg.remove("sales")
    assert reg.list() == []
    with pytest.raises(AdapterNotFound):
        reg.remove("sales")


def _variant(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes,reason", [
    ({"r": 64}, "rank 64 exceeds the serving profile's max_lora_rank 16"),
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "not LORA"),
    ({"rank_pattern": {"q_proj": 64}}, "rank 64 .*rank_pattern.*exceeds the serving profile's max_lora_rank 16"),
    ({"r": 0}, "r = 0"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ({"lora_bias": True}, "lora_bias"),
    ({"bias": "all"}, "bias 'all'"),
    ({"bias": "lora_only"}, "bias 'lora_only'"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights 'pissa'"),
    ({"init_lora_weights": "olora"}, "init_lora_weights 'olora'"),
    ({"layer_replication": [[0, 4]]}, "layer_replication"),
    ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens"),
    ({"use_qalora": True}, "use_qalora"),
    ({"use_bdlora": {"blocks": 2}}, "use_bdlora"),
])
def test_unservable_adapter_is_refused_at_publish_with_its_reason(tmp_path, base, lora, changes, reason):
    bad = _variant(lora, tmp_path / "bad", **changes)
    reg = AdapterRegistry(tmp_path / "reg")
    with pytest.raises(AdapterRefused, match=reason):
        reg.publish(bad, "bad", base, max_lora_rank=16)
    assert reg.list() == []


@pytest.mark.parametrize("changes", [
    {"alpha_pattern": {"q_proj": 64}},
    {"rank_pattern": {"q_proj": 16}},
    {"init_lora_weights": "gaussian"},
    {"init_lora_weights": True},
    {"bias": "none", "lora_bias": False, "layer_replication": None},
])
def test_peft_options_vllm_serves_are_published(tmp_path, base, lora, changes):
    ok = _variant(lora, tmp_path / "ok", **changes)
    assert AdapterRegistry(tmp_path / "reg").publish(ok, "ok", base, max_lora_rank=16).served_name == "ok@v1"


def test_adapter_for_another_base_model_is_refused(tmp_path, base, lora):
    reg = AdapterRegistry(tmp_path)
    a = reg.publish(lora, "x", base)
    other = base.model_copy(update={"name": "Other-Model"})
    assert any("not 'Other-Model'" in p for p in servability_problems(a.path, a.manifest, other, 16))
    tweaked = base.model_copy(update={"dtype": "bfloat16"})
    assert any("different copy" in p for p in servability_problems(a.path, a.manifest, tweaked, 16))
    weights = [f.model_copy(update={"sha256": "0" * 64}) if f.path == "model.safetensors" else f for f in base.files]
    retrained = base.model_copy(update={"files": weights})
    assert any("different copy" in p for p in servability_problems(a.path, a.manifest, retrained, 16))


def test_the_same_weights_imported_again_still_serve_the_adapter(tmp_path, base, lora):
    """A re-import (or another host's import) of the same files has another manifest hash (its time and source),
    not other weights."""
    a = AdapterRegistry(tmp_path).publish(lora, "x", base)
    reimported = base.model_copy(update={"imported_at": datetime.now(timezone.utc),
                                         "origin": base.origin.model_copy(update={"source": "/elsewhere/m.gguf"})})
    assert reimported.canonical_sha256() != base.canonical_sha256()
    assert servability_problems(a.path, a.manifest, reimported, 16) == []
    # An adapter published before manifests recorded the content hash keeps the old, stricter rule, and says so.
    old = a.manifest.model_copy(update={"base_content_sha256": None})
    assert any("publish it again" in p for p in servability_problems(a.path, old, reimported, 16))


def test_folder_without_adapter_config_is_refused(tmp_path, base):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterRefused, match="no adapter_config.json"):
        AdapterRegistry(tmp_path / "reg").publish(tmp_path / "empty", "e", base)


def test_invalid_names_are_refused(tmp_path, base, lora):
    with pytest.raises(AdapterRefused, match="invalid adapter name"):
        AdapterRegistry(tmp_path).publish(lora, "../escape", base)


@pytest.mark.parametrize("name,version", [("ok\n", None), ("ok", "v1\n"), ("ok\r", None), ("ok", "\nv1")])
def test_names_and_versions_with_a_line_break_are_refused(tmp_path, base, lora, name, version):
    reg = AdapterRegistry(tmp_path)
    with pytest.raises(AdapterRefused, match="invalid adapter"):
        reg.publish(lora, name, base, version=version)
    assert reg.list() == []


def test_remove_after_an_interrupted_remove_succeeds_and_cleans_the_leftover(tmp_path, base, lora):
    reg = AdapterRegistry(tmp_path)
    reg.publish(lora, "sup", base)
    # What a remove killed between its rename and its delete leaves behind.
    (tmp_path / "sup" / "v1").rename(tmp_path / "sup" / ".removing-v1")
    assert reg.list() == []
    reg.publish(lora, "sup", base, version="v1")
    assert reg.remove("sup", "v1") == ["sup@v1"]
    assert reg.list() == []
    assert sorted(p.name for p in (tmp_path / "sup").iterdir()) == []
