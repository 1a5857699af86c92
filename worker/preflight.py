"""Settings the worker cannot serve, found before it consumes anything.

``check(settings)`` runs in the Celery parent (``worker_init``), before the consumer starts and
without torch or CUDA: every component source resolves (locally or in the hub cache; a download
only where the hub answers), the checkpoint's head size fits ``CHROMA_ROPE_AXES``, a CUDA device
asked for exists, the Triton kernels asked for can import, the S3 endpoint is a URL. Each problem
is a ``SettingsError`` naming the setting. What needs the device itself (float8 matmuls for
"float8-fast") is checked when the pool process loads, which then stops the whole worker.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from storage import client_from_settings, validate_safetensors_header
from tasks.errors import InvalidLora
from tasks.settings import FAST_DTYPE, DType, Quantization, Settings, SettingsError, Switch
from worker.sources import CHECKPOINT_PREFIXES, resolve

HEAD_KEY = "double_blocks.0.img_attn.norm.query_norm.scale"


def check(settings: Settings) -> None:
    """Raise ``SettingsError`` for the first setting this machine cannot serve."""
    try:
        client_from_settings(settings)
    except ValueError as exc:
        raise SettingsError("s3_endpoint_url", str(exc)) from None
    if settings.quantization is Quantization.FLOAT8_FAST and settings.dtype not in (
        DType.AUTO,
        DType.BFLOAT16,
    ):
        raise SettingsError("dtype", FAST_DTYPE.format(settings.dtype.value))
    paths = {
        name: resolve(getattr(settings, name), setting=name)
        for name in ("transformer", "text_encoder", "tokenizer", "vae")
    }
    head = head_size(paths["transformer"])
    axes = settings.rope_axes
    if axes is not None and head is not None and sum(axes) != head:
        raise SettingsError(
            "rope_axes",
            f"{','.join(map(str, axes))} sums to {sum(axes)}, but the checkpoint's heads are {head} wide",
        )
    cuda = settings.device.startswith("cuda")
    if cuda:
        count = visible_gpus()
        index = int(settings.device.partition(":")[2] or 0)
        if count == 0:
            raise SettingsError(
                "device", f"{settings.device!r}: no NVIDIA GPU is visible here; use cpu or auto"
            )
        if index >= count:
            raise SettingsError(
                "device", f"{settings.device!r}: {count} GPU(s) visible here, cuda:0..cuda:{count - 1}"
            )
    if settings.device == "cpu" and settings.quantization is Quantization.FLOAT8_FAST:
        raise SettingsError(
            "quantization", "'float8-fast' needs a CUDA card with float8 matmuls; use 'float8'"
        )
    if settings.kernels is Switch.ON:
        if settings.device == "cpu" or (settings.device == "auto" and visible_gpus() == 0):
            raise SettingsError("kernels", "'on' needs a CUDA device; use 'auto' or 'off'")
        if importlib.util.find_spec("triton") is None:
            raise SettingsError("kernels", "'on' needs Triton, which is not installed; use 'auto' or 'off'")


def head_size(transformer: Path) -> int | None:
    """The attention head width a transformer checkpoint declares, read from its header only."""
    if transformer.is_dir():
        config = transformer / "config.json"
        if not config.is_file():
            raise SettingsError(
                "transformer", f"{transformer} has no config.json; expected a diffusers transformer folder"
            )
        return int(json.loads(config.read_text()).get("attention_head_dim", 128))
    try:
        header = validate_safetensors_header(transformer)
    except (InvalidLora, OSError) as exc:
        raise SettingsError(
            "transformer", f"{transformer} is not a readable safetensors checkpoint ({exc})"
        ) from None
    for prefix in ("", *CHECKPOINT_PREFIXES):
        entry = header.get(prefix + HEAD_KEY)
        if isinstance(entry, dict) and entry.get("shape"):
            return int(entry["shape"][0])
    raise SettingsError("transformer", f"{transformer} holds no Chroma transformer (no {HEAD_KEY})")


def visible_gpus() -> int:
    """NVIDIA GPUs this process may use, without initialising CUDA: ``CUDA_VISIBLE_DEVICES`` when
    set, else the driver's list."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [part for part in visible.split(",") if part.strip()]
        return 0 if not ids or ids[0].strip() == "-1" else len(ids)
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0
