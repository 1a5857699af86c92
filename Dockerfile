# syntax=docker/dockerfile:1
# GPU worker image: Python 3.12, torch 2.11.0 with CUDA 13.0 (PyTorch's wheels bring the CUDA
# libraries), a C compiler for Triton, and this project. Every version comes from
# scripts/versions.env but the base image's Python, which must match its PYTHON_VERSION (the install
# script refuses another); docs/deploy.md says why this base and what the host needs (an NVIDIA driver
# >= 580 and the NVIDIA container toolkit).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
FROM ${PYTHON_IMAGE}

# Triton builds a small C launcher for its kernels on the worker at run time (torch.compile and the
# q/k/v kernels), so the compiler stays in the runtime image. The base image has Python's headers.
# Debian's current gcc 12 (not a pinned build: the security archive keeps only the latest one).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# Every cache the worker writes lives under /cache, one volume: model downloads (HF_HOME), compiled
# kernels (CHROMA_COMPILE_CACHE_DIR: the worker points Triton and inductor at a folder there keyed by
# torch, Triton, GPU and code version, so a restarted worker reuses them; TRITON_CACHE_DIR and
# TORCHINDUCTOR_CACHE_DIR cover anything compiled outside it), LoRA files, and HOME for the rest.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HOME=/cache/home \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor \
    CHROMA_COMPILE_CACHE_DIR=/cache/compile \
    CHROMA_LORA_CACHE_DIR=/cache/loras \
    CHROMA_HEALTH_FILE=/tmp/chroma-worker/alive

# The runtime user owns /cache before it is declared a volume, so a fresh named volume, which Docker
# fills from the image, starts out writable by that user.
RUN groupadd --gid 1000 chroma \
    && useradd --uid 1000 --gid chroma --home-dir /cache/home --no-create-home --shell /usr/sbin/nologin chroma \
    && mkdir -p /cache/home /cache/huggingface /cache/triton /cache/inductor /cache/compile /cache/loras \
    && chown -R chroma:chroma /cache

WORKDIR /app

# Dependencies before the source: this layer is rebuilt only when a pin, the install script or
# pyproject.toml changes, not for every change to the code.
COPY scripts/versions.env scripts/install-worker.sh scripts/
COPY pyproject.toml ./
RUN scripts/install-worker.sh deps

COPY README.md ./
COPY tasks ./tasks
COPY storage ./storage
COPY worker ./worker
COPY examples ./examples
COPY scripts/healthcheck.py scripts/
RUN scripts/install-worker.sh project && rm -rf build ./*.egg-info

USER 1000:1000
VOLUME ["/cache"]
# Cheap: reads the heartbeat file the worker touches every 15 s once warmed up (CHROMA_HEALTH_FILE),
# with the settings class only; no Celery, no broker.
# The start period covers a first start that downloads ~35 GB of weights and compiles.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
    CMD ["python", "/app/scripts/healthcheck.py"]
CMD ["chroma-worker", "worker", "--loglevel", "INFO"]
