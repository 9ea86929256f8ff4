"""Fixtures of the finetune tests: held-out conversations and a scratch SOVEREIGN_HOME sharing the session's models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sovereign.settings import HomeSettings
# The session helpers, for the fixtures below and the tests beside them.
from tests.conftest import DEFAULT_MODEL, REPO, free_port, run_sovereign, sovereign_cmd  # noqa: F401

HELD_OUT = [
    [{"role": "system", "content": "You are the customer-service assistant of Cedar & Co. Outdoor."},
     {"role": "user", "content": "Where is my order 88213? It was due yesterday."},
     {"role": "assistant", "content": "Sorry for the wait. Order 88213 left our warehouse on Monday and the courier "
                                      "expects to deliver it tomorrow before noon."}],
    [{"role": "system", "content": "青禾家居客服助手。"},
     {"role": "user", "content": "我想退货，怎么操作？"},
     {"role": "assistant", "content": "您好，30 天内可无理由退货。请在订单页面点击“申请退货”，快递员会上门取件。"}],
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "user", "content": "Does the Summit 40 backpack have a warranty?"},
     {"role": "assistant", "content": "Yes, the Summit 40 backpack comes with a one-year warranty."},
     {"role": "user", "content": "And returns?"},
     {"role": "assistant", "content": "You can return it within 30 days, no questions asked."}],
]


@pytest.fixture(scope="session")
def no_pii_rules(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pii-rules") / "none.yaml"
    path.write_text("kinds: {}\n")
    return path


@pytest.fixture(autouse=True, scope="module")
def no_rules_file_of_whoever_runs_the_tests(no_pii_rules):
    """In-process prepare loads the organisation's PII rules: not the ones of whoever runs the tests (~/.sovereign).
    Module-scoped, so that it is in place before a module's own fixtures prepare data (autouse ones come first)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOVEREIGN_PII_RULES", str(no_pii_rules))
        yield


@pytest.fixture(autouse=True)
def built_in_pii_kinds_only():
    """A test that installs kinds of its own leaves the built-in ones behind it."""
    from sovereign import pii_rules

    yield
    pii_rules.uninstall()


@pytest.fixture(scope="session")
def held_out() -> list[list[dict]]:
    return [list(c) for c in HELD_OUT]


@pytest.fixture()
def scratch_home(sovereign_home: Path, tmp_path: Path) -> HomeSettings:
    """A home of its own (registry, jobs) that sees the session's model store, so nothing here reaches vLLM."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(sovereign_home / "models", target_is_directory=True)
    return HomeSettings(home=home)


def write_prepared(folder: Path, train: list[list[dict]], val: list[list[dict]]) -> Path:
    """A prepared-data folder as `sovereign finetune prepare` leaves it (train/val JSONL and a report)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("val.jsonl", val)):
        (folder / name).write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in rows),
                                   encoding="utf-8")
    (folder / "prepare_report.json").write_text(json.dumps({"status": "succeeded", "scrub": {"replaced": {"PHONE": 2}},
                                                             "dedup": {"exact": 1, "near": 0}}), encoding="utf-8")
    return folder


@pytest.fixture()
def make_prepared():
    """`make_prepared(folder, train, val) -> folder`: write a prepared-data folder."""
    return write_prepared
