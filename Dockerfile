# GPU worker image: CUDA PyTorch + this project with its worker extras.
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HOME=/cache/huggingface
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tasks ./tasks
COPY storage ./storage
COPY worker ./worker
COPY examples ./examples
RUN pip install ".[worker]"
USER 1000:1000
CMD ["chroma-worker", "worker", "--loglevel", "INFO"]
