#!/usr/bin/env bash
# Fetches into .whl/ (git-ignored) everything bench/queue_bench.sh needs on the GPU bench machine,
# which has Python 3.12, torch and the transformers stack but no registry access:
#   - a cp312 manylinux x86_64 wheel of each pinned package it lacks (scripts/versions.env:
#     WORKER_PINS, diffusers, torchao, BENCH_PINS, less DEVICE_PROVIDED);
#   - redis-server: Debian 12 packages in .whl/redis/, unpacked there under /tmp.
# botocore ships the model of every AWS service (17 MB as a wheel); the bench talks to S3 alone, so
# its wheel is repacked with only the models in BOTOCORE_SERVICES to keep what travels small. The
# image installs the full botocore from the index.
#
#   bench/device_wheels.sh [DIR]      (default .whl; needs pip, and apt-get for the redis packages)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/versions.env
. scripts/versions.env
DEST=${1:-.whl}
BOTOCORE_SERVICES=${BOTOCORE_SERVICES:-"s3 sts"}
LIMIT_MIB=40

wanted() {  # the pins the machine lacks
  local provided=" $DEVICE_PROVIDED " pin
  for pin in $WORKER_PINS "diffusers==$DIFFUSERS_VERSION" "torchao==$TORCHAO_VERSION" $BENCH_PINS; do
    case "$provided" in *" ${pin%%==*} "*) ;; *) echo "$pin" ;; esac
  done
}

slim_botocore() {  # rewrite the botocore wheel in place with only the kept service models
  # shellcheck disable=SC2086  # one argument per service
  python3 - "$1" $BOTOCORE_SERVICES <<'EOF'
import base64
import hashlib
import sys
import zipfile
from pathlib import Path

wheel, keep = Path(sys.argv[1]), set(sys.argv[2:])


def dropped(name: str) -> bool:
    parts = name.split("/")
    return len(parts) > 3 and parts[:2] == ["botocore", "data"] and parts[2] not in keep


slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
    lines = []
    for info in src.infolist():
        if dropped(info.filename) or info.filename == record_name:
            continue
        data = src.read(info)
        dst.writestr(info, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{info.filename},sha256={digest},{len(data)}")
    lines.append(f"{record_name},,")
    dst.writestr(record_name, "\n".join(lines) + "\n")
before = wheel.stat().st_size
slim.replace(wheel)
print(f"botocore: kept the models of {' '.join(sorted(keep))}: {before >> 20} MiB -> {wheel.stat().st_size >> 20} MiB")
EOF
}

fetch_wheels() {
  local work=$1
  mapfile -t pins < <(wanted)
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYTHON_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$work" "${pins[@]}"
  slim_botocore "$(ls "$work"/botocore-*.whl)"
}

fetch_redis() {
  local work=$1
  mkdir -p "$work/redis"
  # shellcheck disable=SC2086
  (cd "$work/redis" && apt-get download -q $REDIS_DEBS 2>&1 | grep -v "unsandboxed") || true
  local deb
  for deb in $REDIS_DEBS; do
    compgen -G "$work/redis/${deb%%=*}_*.deb" >/dev/null || {
      echo "device_wheels: could not fetch ${deb} (apt-get update first; a newer Debian security" \
        "release replaces the pinned one: update REDIS_DEBS in scripts/versions.env)" >&2
      exit 1
    }
  done
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fetch_wheels "$work"
fetch_redis "$work"
rm -rf "$DEST"
mkdir -p "$(dirname "$DEST")"
cp -r "$work" "$DEST"
chmod -R a+rX "$DEST"
find "$DEST" -name '*.whl' -o -name '*.deb' | sed 's|.*/||' | sort
size=$(du -sm "$DEST" | cut -f1)
echo "$DEST: $(du -sh "$DEST" | cut -f1) in all"
if [ "$size" -gt "$LIMIT_MIB" ]; then
  echo "device_wheels: $DEST is over ${LIMIT_MIB} MiB; the working tree that travels is limited" >&2
  exit 1
fi
