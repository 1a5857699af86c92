#!/usr/bin/env bash
# Idempotent setup for a fresh clone: a virtualenv in .venv with PyTorch, the project (editable) with
# its worker and test extras, and redis-server. A run with nothing to do installs and prints nothing.
# Versions come from scripts/versions.env.
#
# torch: the CPU build where this machine has no NVIDIA driver (no nvidia-smi, no /proc/driver/nvidia),
# from TORCH_CPU_INDEX_URL; PyPI's build (CUDA on Linux) where it has one. TORCH_INDEX_URL overrides:
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu scripts/bootstrap.sh    the CPU build
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 scripts/bootstrap.sh  a CUDA 13.0 build
# Without a driver, a CPU index that does not answer within 3 s leaves the choice to pip's configured
# index. A torch already in .venv at the pinned version is kept, whichever build: remove .venv to change.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/versions.env
. scripts/versions.env
PYTHON=${PYTHON:-python3}
PIP=(python -m pip -q --disable-pip-version-check)

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv ($("$PYTHON" --version))"
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip -q --disable-pip-version-check install --upgrade pip
fi
# shellcheck disable=SC1091
. .venv/bin/activate

# What is missing from .venv, as words: torch, project (this checkout, editable, with its extras and
# the pins; also when pyproject.toml or versions.env changed since it was installed), triton.
digest() { python -I -c 'import hashlib, sys; print(hashlib.sha256(sys.argv[1].encode()).hexdigest()[:16])' "$1"; }
STAMP=".venv/.bootstrap-$(digest "$PWD")"
WANTED=$(digest "$(cat pyproject.toml scripts/versions.env)")
missing() {
  python -I - "$PWD" "$STAMP" "$WANTED" "$TORCH_TEST_VERSION" "$DIFFUSERS_VERSION" "$TORCHAO_VERSION" <<'EOF'
import importlib.util
import json
import sys
from importlib import metadata
from pathlib import Path

root, stamp, wanted, torch_pin, diffusers_pin, torchao_pin = sys.argv[1:]


def version(name: str) -> str | None:
    try:
        return metadata.version(name).split("+")[0]
    except metadata.PackageNotFoundError:
        return None


try:
    direct = json.loads(metadata.distribution("chroma-worker").read_text("direct_url.json") or "{}")
except metadata.PackageNotFoundError:
    direct = {}
stamped = Path(stamp).read_text().strip() if Path(stamp).exists() else None
missing = []
if version("torch") != torch_pin:
    missing.append("torch")
if (
    direct.get("url") != Path(root).resolve().as_uri()
    or not direct.get("dir_info", {}).get("editable")
    or stamped != wanted
    or version("diffusers") != diffusers_pin
    or version("torchao") != torchao_pin
):
    missing.append("project")
if importlib.util.find_spec("triton") is None:
    missing.append("triton")
print(" ".join(missing))
EOF
}

# Exit 0 when the index answers at all (any HTTP status) within 3 s, or is a local folder: pip would
# otherwise spend minutes retrying an index this machine cannot reach.
reachable() {
  python -I - "$1" <<'EOF'
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

url = urllib.parse.urlparse(sys.argv[1].rstrip("/") + "/torch/")
if url.scheme == "file":
    sys.exit(0 if Path(urllib.request.url2pathname(url.path)).is_dir() else 1)
try:
    urllib.request.urlopen(urllib.request.Request(url.geturl(), method="HEAD"), timeout=3)
except urllib.error.HTTPError:
    pass  # it answered
except (OSError, ValueError):
    sys.exit(1)
EOF
}

install_torch() {
  local index="" from why
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    reachable "$TORCH_INDEX_URL" || { echo "bootstrap: TORCH_INDEX_URL=$TORCH_INDEX_URL does not answer" >&2; exit 1; }
    index=$TORCH_INDEX_URL why="TORCH_INDEX_URL"
  elif command -v nvidia-smi >/dev/null 2>&1 || [ -e /proc/driver/nvidia ]; then
    why="an NVIDIA driver is present"
  elif reachable "$TORCH_CPU_INDEX_URL"; then
    index=$TORCH_CPU_INDEX_URL why="no NVIDIA driver found"
  else
    why="no NVIDIA driver found, but $TORCH_CPU_INDEX_URL does not answer"
  fi
  from=${index:-"pip's configured index"}
  echo "bootstrap: installing torch $TORCH_TEST_VERSION from $from ($why; TORCH_INDEX_URL chooses)"
  "${PIP[@]}" install "torch==$TORCH_TEST_VERSION" ${index:+--index-url "$index"}
  python -I - <<'EOF'
from importlib import metadata

version = metadata.version("torch")
cuda = "+cu" in version or any(r.startswith("nvidia-") for r in metadata.requires("torch") or [])
print(f"bootstrap: torch {version}, the {'CUDA' if cuda else 'CPU'} build")
EOF
}

steps=$(missing)
for step in $steps; do
  case "$step" in
    torch) install_torch ;;
    project)
      echo "bootstrap: installing chroma-worker (editable) with its worker and test extras"
      # The editable install's build prints a setuptools notice about folders named like the package.
      PYTHONWARNINGS="ignore:Editable installation" "${PIP[@]}" install -e ".[worker,test]" \
        "torch==$TORCH_TEST_VERSION" "diffusers==$DIFFUSERS_VERSION" "torchao==$TORCHAO_VERSION"
      echo "$WANTED" >"$STAMP"
      ;;
    triton)
      # A CPU build of torch comes without Triton; the kernel tests run Triton's interpreter.
      echo "bootstrap: installing triton $TRITON_TEST_VERSION (the kernel tests run its interpreter)"
      "${PIP[@]}" install "triton==$TRITON_TEST_VERSION"
      ;;
  esac
done

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing redis-server (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is needed (the demo and the tests start their own): apt-get install redis-server, or brew install redis" >&2
    exit 1
  fi
fi
