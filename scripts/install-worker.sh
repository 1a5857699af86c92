#!/usr/bin/env bash
# Installs the GPU worker at the versions in scripts/versions.env. One script for the image and for
# the GPU bench machine, so a bench run exercises the image's install path:
#
#   install-worker.sh deps                     image, before the source is copied: torch (CUDA build)
#                                              and every worker dependency from pyproject.toml, pinned
#   install-worker.sh project                  image, after the source is copied: the project, no deps
#   install-worker.sh wheels DIR --target DIR  a machine with no registry: the wheels carried in DIR
#                                              (bench/device_wheels.sh), no index, no dependency solving
#   install-worker.sh check [--own NAMES]      import the worker's packages and compare them with the
#                                              pins (every install above ends with it)
#
# PYTHON picks the interpreter (default python3); it must be Python $PYTHON_VERSION.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
# shellcheck source=scripts/versions.env
. "$HERE/versions.env"
PYTHON=${PYTHON:-python3}
PIP=("$PYTHON" -m pip --disable-pip-version-check)

usage() {
  sed -n '2,13p' "$0" >&2
  exit 2
}

require_python() {
  local have
  have=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$have" != "$PYTHON_VERSION" ]; then
    echo "install-worker: $PYTHON is Python $have; scripts/versions.env pins $PYTHON_VERSION" >&2
    exit 1
  fi
}

all_pins() {  # one "name==version" a line
  # shellcheck disable=SC2086  # WORKER_PINS is a list of words
  printf '%s\n' $WORKER_PINS "diffusers==$DIFFUSERS_VERSION" "torchao==$TORCHAO_VERSION" \
    "torch==$TORCH_GPU_VERSION"
}

all_pin_names() {
  all_pins | sed 's/==.*//' | tr '\n' ' '
}

project_requirements() {  # the base and worker dependencies, read from pyproject.toml
  "$PYTHON" - "$ROOT/pyproject.toml" <<'EOF'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["worker"]))
EOF
}

install_deps() {
  require_python
  local work
  work=$(mktemp -d)
  all_pins >"$work/constraints.txt"
  project_requirements >"$work/requirements.txt"
  # torch first, from the index of its CUDA build (which also serves the CUDA libraries it needs);
  # the rest from the default index, pinned, with torch held at the same version.
  "${PIP[@]}" install "torch==$TORCH_GPU_VERSION" --index-url "$TORCH_GPU_INDEX_URL"
  "${PIP[@]}" install -r "$work/requirements.txt" -c "$work/constraints.txt"
  rm -rf "$work"
  IMPORT_ALL=1 check "$(all_pin_names)"
}

install_project() {
  require_python
  "${PIP[@]}" install --no-deps "$ROOT"
  # The dependencies were checked by `deps` and --no-deps changed none: check what this added.
  "$PYTHON" -c 'import tasks.cli, worker.engine' && echo "install-worker: project installed"
}

install_wheels() {
  local wheels=$1 target=$2 stamp
  require_python
  compgen -G "$wheels/*.whl" >/dev/null || { echo "install-worker: no wheels in $wheels" >&2; exit 1; }
  stamp=$(sha256sum "$wheels"/*.whl | sha256sum | cut -c1-16)
  if [ "$(cat "$target/.installed-wheels" 2>/dev/null)" != "$stamp" ]; then
    "${PIP[@]}" install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" \
      "$wheels"/*.whl
    echo "$stamp" >"$target/.installed-wheels"
  fi
  local own=() wheel
  for wheel in "$wheels"/*.whl; do
    wheel=$(basename "$wheel")
    own+=("${wheel%%-*}")
  done
  PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" EXTRA_PINS="$BENCH_PINS" check "${own[*]}"
}

# Every pin (and EXTRA_PINS) compared with what the interpreter finds. A mismatch in a package this
# run installed (OWN) fails; one in a package the machine brought is reported and left to the caller.
# The light packages are imported; torch, diffusers and torchao too with IMPORT_ALL=1 (the image).
check() {
  OWN="$1" PINS="$(all_pins | tr '\n' ' ') ${EXTRA_PINS:-}" IMPORT_ALL="${IMPORT_ALL:-0}" "$PYTHON" - <<'EOF'
import importlib
import importlib.util
import os
import re
import sys
from importlib import metadata


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


own = {canonical(n) for n in os.environ["OWN"].split()}
failed, warned = [], []
for pin in os.environ["PINS"].split():
    name, wanted = pin.split("==")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if have is None or have.split("+")[0] != wanted:
        (failed if canonical(name) in own else warned).append(f"{name} {have} (pinned {wanted})")
for module in ("celery", "kombu", "redis", "boto3", "pydantic_settings"):
    importlib.import_module(module)
for module in ("torch", "diffusers", "torchao"):
    if os.environ["IMPORT_ALL"] == "1":
        importlib.import_module(module)
    elif importlib.util.find_spec(module) is None:
        failed.append(f"{module} not importable")
for line in warned:
    print(f"install-worker: warning: this machine has {line}", file=sys.stderr)
if failed:
    sys.exit("install-worker: installed versions differ from scripts/versions.env: " + "; ".join(failed))
print(f"install-worker: ok (python {sys.version.split()[0]}, torch {metadata.version('torch')}, pins checked)")
EOF
}

[ $# -ge 1 ] || usage
command=$1
shift
case "$command" in
  deps) install_deps ;;
  project) install_project ;;
  wheels)
    if [ $# -ne 3 ] || [ "$2" != "--target" ]; then usage; fi
    install_wheels "$1" "$3"
    ;;
  check)
    if [ "${1:-}" = "--own" ]; then check "${2:-}"; else check "$(all_pin_names)"; fi
    ;;
  *) usage ;;
esac
