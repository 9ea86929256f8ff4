"""The serving benchmark's server names: llama.cpp as a peer on its default threads or on N threads."""

from __future__ import annotations

from pathlib import Path

from benchmarks.serving.run import _is_peer, _make
from benchmarks.serving.servers import LlamaCppServer, VllmServer


def test_llamacpp_with_a_thread_count_is_a_peer_on_that_many_threads(tmp_path: Path):
    assert _is_peer("llamacpp") and _is_peer("llamacpp:2")
    assert not _is_peer("llamacpp:two") and not _is_peer("vllm") and not _is_peer("vllm:llamacpp")
    two = _make("llamacpp:2", tmp_path, "cpu", {}, None, tmp_path, 0)
    assert isinstance(two, LlamaCppServer) and two.n_threads == 2
    assert "--n_threads" in two.command() and two.command()[two.command().index("--n_threads") + 1] == "2"
    default = _make("llamacpp", tmp_path, "cpu", {}, None, tmp_path, 0)
    assert default.n_threads is None and "--n_threads" not in default.command()
    assert _make("llamacpp", tmp_path, "cpu", {}, 1, tmp_path, 0).n_threads == 1
    assert isinstance(_make("vllm:x", tmp_path, "cpu", {"A": "1"}, None, tmp_path, 0), VllmServer)
