"""Compiled kernels made once, reused by every later worker of the same versions.

A cold worker spends most of its start compiling (torch.compile of the two block functions, the
Triton kernels): on the same torch, Triton, GPU and code, that work gives the same result, so it is
kept. ``activate`` points torch inductor's and Triton's caches at a folder keyed by everything the
compiled code depends on (``compile_key``), with a manifest checked before use, so a worker never
loads artifacts of another torch, Triton, GPU or code version. After warm-up, ``export`` writes
torch's portable cache artifacts (``torch.compiler.save_cache_artifacts``) beside them; a worker on
a fresh machine whose folder is empty loads them (``import_artifacts``) from the same keyed place in
object storage, when one is configured (``CHROMA_COMPILE_CACHE_URI``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from botocore.client import BaseClient

from storage import download_bytes, upload_bytes
from tasks.errors import WorkerError
from tasks.settings import Settings

log = logging.getLogger(__name__)

WORKER_DIR = Path(__file__).resolve().parent
MANIFEST = "manifest.json"
ARTIFACTS = "artifacts.bin"
KEYS_KEPT = 4  # older keyed folders are removed, newest first kept


@dataclass(frozen=True)
class CompileCache:
    folder: Path  # <root>/<key>
    key: str
    manifest: dict[str, str]
    warm: bool  # the folder held artifacts of this key before this worker started
    remote: bool = False  # artifacts of this key came from object storage

    @property
    def state(self) -> str:
        return "warm" if self.warm else "remote" if self.remote else "cold"


def versions(device: torch.device) -> dict[str, str]:
    """Everything the compiled code depends on: torch, Triton, CUDA, the card, the engine's code."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        name, capability = platform.processor() or platform.machine(), "cpu"
    code = hashlib.sha256()
    for path in sorted(WORKER_DIR.glob("*.py")):
        code.update(path.name.encode() + b"\0" + path.read_bytes())
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": str(torch.version.cuda),
        "device": name,
        "capability": capability,
        "python": platform.python_version(),
        "code": code.hexdigest()[:16],
    }


def compile_key(manifest: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:20]


def activate(root: str | os.PathLike[str], device: torch.device) -> CompileCache:
    """Point inductor and Triton at ``<root>/<key>``; call before anything is compiled."""
    manifest = versions(device)
    key = compile_key(manifest)
    base = Path(root).expanduser()
    folder = base / key
    found = folder / MANIFEST
    if found.is_file() and _read_manifest(found) != manifest:
        # A collision or a damaged folder: never load what it holds.
        log.warning("compile cache %s does not match this worker; starting it afresh", folder)
        shutil.rmtree(folder, ignore_errors=True)
    # Warm: an earlier worker of this key finished its warm-up here (it writes the artifacts last).
    warm = (folder / ARTIFACTS).is_file()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    _prune(base, keep=folder)
    log.info("compile cache %s (%s)", folder, "warm" if warm else "cold")
    return CompileCache(folder, key, manifest, warm)


def _read_manifest(path: Path) -> dict[str, str] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def export(cache: CompileCache) -> bytes | None:
    """torch's portable artifacts for what this process compiled, also kept in the folder."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    data, _info = saved
    (cache.folder / ARTIFACTS).write_bytes(data)
    return data


def import_artifacts(data: bytes) -> None:
    """Pre-fill the caches with another worker's artifacts (same key: checked by the caller)."""
    torch.compiler.load_cache_artifacts(data)


def _prune(base: Path, keep: Path) -> None:
    folders = [p for p in base.iterdir() if p.is_dir() and (p / MANIFEST).exists() and p != keep]
    folders.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in folders[KEYS_KEPT - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def prepare(settings: Settings, device: torch.device, s3: BaseClient) -> CompileCache:
    """The keyed compile cache, filled from object storage when it is empty here and a copy is
    kept there (``CHROMA_COMPILE_CACHE_URI``)."""
    cache = activate(settings.compile_cache_dir, device)
    if cache.warm or settings.compile_cache_uri is None:
        return cache
    bucket, key = remote_artifacts(settings.compile_cache_uri, cache.key)
    try:
        data = download_bytes(s3, bucket, key)
    except WorkerError as exc:  # storage down: compile instead of failing the start
        log.warning("compile artifacts not fetched (%s); compiling", exc)
        return cache
    if data is not None:
        import_artifacts(data)
        log.info("compile artifacts loaded from s3://%s/%s (%d bytes)", bucket, key, len(data))
        return dataclasses.replace(cache, remote=True)
    return cache


def keep(settings: Settings, cache: CompileCache, s3: BaseClient) -> None:
    """After a cold warm-up: keep torch's portable artifacts beside the cache, and in object
    storage when configured, for the next worker of the same versions."""
    data = export(cache)
    if data is None or settings.compile_cache_uri is None or cache.remote:
        return
    bucket, key = remote_artifacts(settings.compile_cache_uri, cache.key)
    try:
        upload_bytes(s3, bucket, key, data, "application/octet-stream")
    except WorkerError as exc:
        log.warning("compile artifacts not stored in s3://%s/%s: %s", bucket, key, exc)


def counters() -> dict[str, float]:
    """How the warm-up's compiles went: graphs made, inductor and AOT cache hits and misses."""
    from torch._dynamo.utils import counters as seen

    return {
        "graphs": seen["stats"]["unique_graphs"],
        "fx_cache_hits": seen["inductor"]["fxgraph_cache_hit"],
        "fx_cache_misses": seen["inductor"]["fxgraph_cache_miss"],
        "aot_cache_hits": seen["aot_autograd"]["autograd_cache_hit"],
        "aot_cache_misses": seen["aot_autograd"]["autograd_cache_miss"],
    }


def log_phases() -> None:
    """Where compile time went, phase by phase (the largest first), for the start's breakdown."""
    from torch._dynamo.utils import compile_times

    rows = []
    for line in str(compile_times(repr="str")).splitlines():
        name, _, seconds = line.rpartition(",")
        try:
            rows.append((float(seconds), name.strip()))
        except ValueError:
            continue
    top = ", ".join(f"{name} {seconds:.1f}" for seconds, name in sorted(rows, reverse=True)[:12])
    log.info("compile phases (s): %s", top)


def remote_artifacts(uri: str, cache_key: str) -> tuple[str, str]:
    """(bucket, key) of a compile key's artifacts under ``s3://bucket/prefix``."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, "/".join(part for part in (prefix.strip("/"), f"{cache_key}.bin") if part)
