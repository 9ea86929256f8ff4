"""FinetuneConfig: defaults vLLM can serve, refusals that name the file and the field."""

from __future__ import annotations

import pytest

from finetune.config import FinetuneConfig
from sovereign.errors import ConfigError


@pytest.mark.parametrize("name", ["customer-service", "ci-smoke"])
def test_shipped_configs_load(name):
    cfg = FinetuneConfig.named(name)
    assert cfg.name == name
    assert cfg.lora.target_modules == "all-linear"
    assert cfg.lora.use_dora is False and cfg.lora.modules_to_save is None
    assert cfg.lora.r <= 16


def test_default_rank_is_16_within_the_cpu_profile():
    cfg = FinetuneConfig.load(None, name="x")
    assert cfg.lora.r == 16 and cfg.serving_profile == "cpu"


@pytest.mark.parametrize("lora, fragment", [
    ({"r": 32}, "exceeds max_lora_rank = 16"),
    ({"r": 12}, "lora.r"),
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"),
])
def test_unservable_lora_is_refused_at_load(lora, fragment):
    with pytest.raises(ConfigError) as err:
        FinetuneConfig.named("ci-smoke", lora=lora)
    assert "ci-smoke.yaml" in str(err.value)
    assert fragment in str(err.value)


def test_env_overrides_the_file(monkeypatch):
    monkeypatch.setenv("SOVEREIGN_FINETUNE_TRAINING__MAX_STEPS", "3")
    assert FinetuneConfig.named("ci-smoke").training.max_steps == 3


def test_unknown_field_names_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntraining:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError) as err:
        FinetuneConfig.load(path)
    assert "training.learning_rat" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("name", ["Bad Name!", "ok\n", "ok\r"])
def test_bad_adapter_name_is_refused(name):
    with pytest.raises(ConfigError) as err:
        FinetuneConfig.load(None, name=name)
    assert "name" in str(err.value)
