#!/usr/bin/env bash
# Idempotent setup for a fresh machine: a virtualenv in .venv with PyTorch, the project with its
# worker and test extras, and redis-server. Set TORCH_INDEX_URL to install torch from another
# wheel index (for example a CPU-only one). Versions come from scripts/versions.env.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/versions.env
. scripts/versions.env
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check --upgrade pip
python -m pip install -q --disable-pip-version-check "torch==$TORCH_TEST_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
python -m pip install -q --disable-pip-version-check -e ".[worker,test]" \
  "diffusers==$DIFFUSERS_VERSION" "torchao==$TORCHAO_VERSION"
# A CPU build of torch comes without Triton; the kernel tests run Triton's interpreter.
python -c "import triton" 2>/dev/null || python -m pip install -q --disable-pip-version-check "triton==$TRITON_TEST_VERSION"
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is needed (the demo and the tests start their own): apt-get install redis-server, or brew install redis" >&2
    exit 1
  fi
fi
