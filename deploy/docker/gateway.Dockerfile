# The gateway: the base dependencies only (no torch, transformers or vllm), so the image stays small and starts fast.
# Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t sovereign/gateway:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sovereign sovereign
COPY serving serving
COPY finetune finetune
COPY gateway gateway
COPY configs configs
# `pip install .` pulls the base dependencies only; the rooms' heavy libraries live in extras this image leaves out.
# sovereign.settings looks for configs/ beside the packages (e.g. `sovereign keys create --config default`).
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install . \
 && cp -r configs "$(/opt/venv/bin/python -c 'import pathlib, sovereign; print(pathlib.Path(sovereign.__file__).parent.parent)')/configs" \
 && ! /opt/venv/bin/python -c "import torch" 2>/dev/null

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 sovereign \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/sovereign --no-create-home --shell /usr/sbin/nologin sovereign \
 && mkdir -p /var/lib/sovereign /etc/sovereign \
 && chown 10001:10001 /var/lib/sovereign
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SOVEREIGN_HOME=/var/lib/sovereign
USER 10001:10001
WORKDIR /var/lib/sovereign
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["sovereign"]
CMD ["gateway", "--config", "/etc/sovereign/gateway.yaml", "--host", "0.0.0.0", "--port", "8080"]
