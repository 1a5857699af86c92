#!/usr/bin/env bash
# Runs bench/queue_bench.py (the whole stack end to end) on the machine it is on.
#
# On the GPU bench machine, which has Python 3.12 and torch but no registry: installs the wheels
# carried in .whl/ (bench/device_wheels.sh) into $CHROMA_BENCH_SITE with scripts/install-worker.sh,
# the image's own install step, and unpacks the carried redis packages (.whl/redis/*.deb) under
# /tmp. Where the interpreter already has the worker's packages (this repo's .venv), it installs
# nothing, and a redis-server on PATH is used as it is.
#
# Every cache the worker writes (HOME, TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR, HF_HOME, the
# LoRA cache) lives under one root, $CHROMA_BENCH_CACHE, so a second worker reuses the first one's.
#
#   bash bench/queue_bench.sh --out $OUT                               # full size, CUDA
#   bash bench/queue_bench.sh --scale tiny --device cpu --out /tmp/qb  # the code paths on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE_ROOT=${CHROMA_BENCH_CACHE:-/tmp/chroma-queue-bench/cache}
SITE=${CHROMA_BENCH_SITE:-/tmp/site}
REDIS_ROOT=/tmp/chroma-queue-bench/redis-root

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON

lacks_worker_packages() {
  ! "$PYTHON" -c 'import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))' \
    celery kombu redis boto3 pydantic_settings diffusers torchao moto flask
}

unpack_deb() {  # dpkg-deb where there is one, else ar + tar (Debian 12 packages hold data.tar.xz)
  if command -v dpkg-deb >/dev/null 2>&1; then
    dpkg-deb -x "$1" "$2"
  else
    ar p "$1" data.tar.xz | tar -xJ -C "$2"
  fi
}

find_redis() {
  if [ -n "${REDIS_SERVER:-}" ]; then return; fi
  if command -v redis-server >/dev/null 2>&1; then
    REDIS_SERVER=$(command -v redis-server)
  elif compgen -G ".whl/redis/*.deb" >/dev/null; then
    REDIS_SERVER=$REDIS_ROOT/usr/bin/redis-server
    if [ ! -x "$REDIS_SERVER" ]; then
      mkdir -p "$REDIS_ROOT"
      for deb in .whl/redis/*.deb; do unpack_deb "$deb" "$REDIS_ROOT"; done
    fi
    LD_LIBRARY_PATH=$REDIS_ROOT/usr/lib/x86_64-linux-gnu "$REDIS_SERVER" --version >/dev/null || {
      echo "queue_bench: $REDIS_SERVER does not run here; its missing libraries:" >&2
      LD_LIBRARY_PATH=$REDIS_ROOT/usr/lib/x86_64-linux-gnu ldd "$REDIS_SERVER" | grep "not found" >&2 || true
      exit 1
    }
  else
    echo "queue_bench: no redis-server on PATH and no .whl/redis/*.deb (bench/device_wheels.sh)" >&2
    exit 1
  fi
}

if lacks_worker_packages; then
  scripts/install-worker.sh wheels .whl --target "$SITE"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT"
find_redis
export REDIS_SERVER

mkdir -p "$CACHE_ROOT"/{home,triton,inductor,huggingface}
export CHROMA_BENCH_CACHE=$CACHE_ROOT HOME=$CACHE_ROOT/home TRITON_CACHE_DIR=$CACHE_ROOT/triton \
  TORCHINDUCTOR_CACHE_DIR=$CACHE_ROOT/inductor HF_HOME=$CACHE_ROOT/huggingface PYTHONUNBUFFERED=1
exec "$PYTHON" bench/queue_bench.py "$@"
