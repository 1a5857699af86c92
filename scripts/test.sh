#!/usr/bin/env bash
# Every test: unit (CPU, tiny model) and integration (Redis, S3 over HTTP, real worker processes).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
