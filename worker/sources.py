"""Where components come from: a local path, a hub ``org/repo``, a hub folder
``org/repo/subfolder`` or a hub file ``org/repo/file.safetensors``.

Hub sources resolve through the local Hugging Face cache and are downloaded only when missing
there and the hub answers (``HF_HUB_OFFLINE=1`` forbids even that), so a node can run from
pre-staged files. Torch-free: the worker's parent process checks its sources before it consumes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from tasks.settings import SettingsError

log = logging.getLogger(__name__)

# The key prefixes a single-file transformer checkpoint may carry before the original names.
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


@dataclass(frozen=True)
class Sources:
    transformer: str
    text_encoder: str
    tokenizer: str
    vae: str


HUB_HOST = "huggingface.co"
HUB_PROBE_SECONDS = 3.0
LOCAL_HINT = (
    "point it at a local copy (a path), or run `chroma-worker tiny-model DIR` for a tiny random model "
    "to try the pipeline with"
)


def resolve(source: str, setting: str = "transformer") -> Path:
    """A local path for ``source``: the path itself, or the hub's local cache, downloading from the
    hub only when the file is missing there and the hub answers. Anything else raises
    ``SettingsError`` naming ``setting`` in one line (no retry storm when offline)."""
    local = Path(source).expanduser()
    try:
        if local.exists():
            return local
    except OSError as exc:  # a symlink loop, a path too long, no permission
        raise SettingsError(
            setting, f"{source!r} cannot be read ({exc.strerror or exc}); {LOCAL_HINT}"
        ) from None
    parts = source.strip("/").split("/")
    if len(parts) < 2 or source.startswith((".", "/", "~")):
        raise SettingsError(setting, f"{source!r} is neither an existing path nor a hub id; {LOCAL_HINT}")
    repo, rest = "/".join(parts[:2]), "/".join(parts[2:])
    cached = _from_hub(repo, rest, local_only=True)
    if cached is not None:
        return cached
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or not _hub_reachable():
        raise SettingsError(
            setting,
            f"{source!r} is not in the local Hugging Face cache and the hub is not reachable from here; "
            + LOCAL_HINT,
        )
    try:
        found = _from_hub(repo, rest, local_only=False)
    except Exception as exc:  # noqa: BLE001 - the hub's errors are many; the setting is what to fix
        raise SettingsError(
            setting, f"{source!r} could not be downloaded ({type(exc).__name__}); {LOCAL_HINT}"
        ) from None
    assert found is not None
    return found


def _from_hub(repo: str, rest: str, local_only: bool) -> Path | None:
    """The hub file or folder from the local cache (or downloaded); None when not cached."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        if rest.endswith((".safetensors", ".json")):
            return Path(hf_hub_download(repo_id=repo, filename=rest, local_files_only=local_only))
        patterns = [f"{rest}/*"] if rest else None
        root = Path(snapshot_download(repo_id=repo, allow_patterns=patterns, local_files_only=local_only))
    except LocalEntryNotFoundError:
        if local_only:
            return None
        raise
    folder = root / rest if rest else root
    if local_only and not any(folder.iterdir()):
        return None
    return folder


def _hub_reachable() -> bool:
    """One quick TCP connect to the hub, instead of the hub client's retries."""
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=HUB_PROBE_SECONDS):
            return True
    except OSError:
        return False


def fingerprint(path: Path) -> str:
    """Cheap content identity: sha256 over each weight file's safetensors header and size."""
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    files += sorted(path.glob("*.json")) if path.is_dir() else []
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}:".encode())
        with file.open("rb") as f:
            if file.suffix == ".safetensors":
                header_len = int.from_bytes(f.read(8), "little")
                digest.update(f.read(min(header_len, 100 * 2**20)))
            else:
                digest.update(f.read())
    return digest.hexdigest()[:16]
