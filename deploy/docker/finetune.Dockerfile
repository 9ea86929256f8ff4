# Fine-tune Jobs (`sovereign finetune run-job JOB_DIR`): torch, transformers, peft, datasets, accelerate.
# On GPUs it builds on vLLM's CUDA image, so torch and CUDA are the ones serving runs (and the layers are shared
# with sovereign/serving when mirrored). Build from the repository root:
#   docker build -f deploy/docker/finetune.Dockerfile -t sovereign/finetune:0.1.0 .
# Without GPUs, build it on the CPU serving image instead:
#   docker build -f deploy/docker/finetune.Dockerfile --build-arg BASE_IMAGE=sovereign/serving:0.1.0-cpu \
#     -t sovereign/finetune:0.1.0-cpu .
ARG BASE_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${BASE_IMAGE}
#checkov:skip=CKV_DOCKER_2:Runs batch Jobs that end by themselves; there is no server to health-check.
USER root
# The base image's Python is the system one; installing next to its vLLM and torch is the point of this image.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_BREAK_SYSTEM_PACKAGES=1
WORKDIR /opt/sovereign-src
COPY pyproject.toml README.md ./
COPY sovereign sovereign
COPY serving serving
COPY finetune finetune
COPY gateway gateway
COPY configs configs
# torch comes with the base image (the `finetune` extra leaves its version free); the extra adds peft, datasets,
# accelerate. Both base images name their Python `python3`.
RUN python3 -m pip install ".[finetune]" \
 && cp -r configs "$(python3 -c 'import pathlib, sovereign; print(pathlib.Path(sovereign.__file__).parent.parent)')/configs" \
 && python3 -c "import torch, peft, datasets, finetune" \
 && rm -rf /opt/sovereign-src \
 && (getent passwd 10001 >/dev/null || (groupadd --gid 10001 sovereign \
     && useradd --uid 10001 --gid 10001 --home-dir /var/lib/sovereign --no-create-home --shell /usr/sbin/nologin sovereign)) \
 && mkdir -p /var/lib/sovereign \
 && chown 10001:10001 /var/lib/sovereign
ENV PYTHONUNBUFFERED=1 \
    SOVEREIGN_HOME=/var/lib/sovereign \
    HOME=/var/lib/sovereign \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1
USER 10001:10001
WORKDIR /var/lib/sovereign
ENTRYPOINT ["sovereign"]
CMD ["finetune", "--help"]
