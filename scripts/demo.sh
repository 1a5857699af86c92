#!/usr/bin/env bash
# The main job end to end on the embedded default: tiny random Chroma on the CPU, a private Redis,
# an S3 endpoint over HTTP, a real worker process, the reference example request.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python scripts/demo.py "$@"
