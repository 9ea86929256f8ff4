#!/usr/bin/env bash
# Installs what the serving benchmark needs beyond the platform: the `bench` extra of pyproject.toml
# (llama-cpp-python[server], the peer we measure against). Only PyPI is used, so llama.cpp is compiled from the
# sdist for this CPU (GGML_NATIVE: AVX2/AVX-512 as the machine has them); pip caches the built wheel, so a
# second run is quick. The project itself is not reinstalled. llama.cpp's AMX matmul is left out: on this
# workplace's AMX host (llama-cpp-python 0.3.36) it crashed the server with a segfault in ggml_backend_amx_mul_mat
# on the first token of the default model; without it llama.cpp uses AVX-512 (VNNI, BF16).
#
#   bash benchmarks/serving/setup.sh            # uses .venv/bin/python, or $PYTHON
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-.venv/bin/python}"
mapfile -t reqs < <("$PY" - <<'PYEOF'
import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"]["bench"]))
PYEOF
)
if "$PY" -c "import llama_cpp, llama_cpp.server" 2>/dev/null; then
    echo "bench extra already installed: llama-cpp-python $("$PY" -c 'import llama_cpp; print(llama_cpp.__version__)')"
    exit 0
fi
echo "installing ${reqs[*]} (compiles llama.cpp: several minutes on a small machine)"
no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON '-DCMAKE_C_FLAGS=$no_amx' '-DCMAKE_CXX_FLAGS=$no_amx'}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$PY" -m pip install "${reqs[@]}"
