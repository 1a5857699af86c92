"""Encoding images and assembling result.json (DESIGN.md section 5)."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import platform
import socket
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from tasks.schemas import GenerationRequest, ResolvedPrompt

FORMATS = {
    "png": ("PNG", "image/png", "png"),
    "jpeg": ("JPEG", "image/jpeg", "jpg"),
    "webp": ("WEBP", "image/webp", "webp"),
}


def effective_parameters(p: ResolvedPrompt) -> dict[str, Any]:
    return {
        "prompt": p.prompt,
        "neg": p.neg,
        "width": p.width,
        "height": p.height,
        "sample_steps": p.sample_steps,
        "guidance_scale": p.guidance_scale,
        "seed": p.seed,
    }


def encode_image(
    image: Image.Image, fmt: str, p: ResolvedPrompt, extra: dict[str, Any]
) -> tuple[bytes, str, str]:
    """(bytes, content type, extension); PNGs carry the effective parameters in a text chunk."""
    pil_format, content_type, ext = FORMATS[fmt]
    buffer = io.BytesIO()
    params = json.dumps({**effective_parameters(p), **extra}, sort_keys=True)
    if pil_format == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", params)
        image.save(buffer, format="PNG", pnginfo=info)
    elif pil_format == "JPEG":
        image.save(buffer, format="JPEG", quality=95, comment=params.encode())
    else:
        image.save(buffer, format="WEBP", quality=95)
    return buffer.getvalue(), content_type, ext


def image_entry(p: ResolvedPrompt, key: str, uri: str, data: bytes, content_type: str) -> dict[str, Any]:
    return {
        "index": p.index,
        **effective_parameters(p),
        "key": key,
        "uri": uri,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "content_type": content_type,
    }


def lora_entry(spec, uri: str, etag: str | None, sha256: str) -> dict[str, Any]:
    """result.json's record of one requested LoRA (``layers_merged`` is filled in by ``settle``)."""
    return {
        "path": spec.path,
        "uri": uri,
        "etag": etag,
        "sha256": sha256,
        "network_multiplier": spec.network_multiplier,
        "layers_merged": 0,
    }


@functools.cache
def versions() -> dict[str, str | None]:
    """Package, torch, CUDA and GPU versions; fixed for the life of the process."""

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {
        "chroma_worker": version("chroma-worker"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": gpu,
        "diffusers": version("diffusers"),
        "transformers": version("transformers"),
        "torchao": version("torchao"),
        "celery": version("celery"),
    }


def build_result(
    *,
    task_id: str,
    request: GenerationRequest,
    images: list[dict[str, Any]],
    loras: list[dict[str, Any]],
    engine,
    variant: dict[str, Any],
    timings: dict[str, float],
    delivery: int,
    result_key: str,
    worker: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "status": "succeeded",
        "request": request.model_dump(mode="json"),
        "images": images,
        "loras": loras,
        "components": engine.component_info(),
        "quantization": engine.config.quantization,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "variant": variant,
        "versions": dict(versions()),
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "worker": {"host": socket.gethostname(), "device": str(engine.device), **(worker or {})},
        "delivery": delivery,
        "result_key": result_key,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def add_timings(total: dict[str, float], part: dict[str, float]) -> None:
    for name, seconds in part.items():
        total[name] = total.get(name, 0.0) + seconds


def settle(generation, lora_meta: list[dict[str, Any]], timings: dict[str, float]) -> None:
    """Fold a Generation's timings and per-LoRA layer counts into the result being built."""
    add_timings(timings, generation.timings)
    timings["variant_hit" if generation.variant["cache_hit"] else "variant_build"] = timings.pop("variant")
    for meta, layers in zip(lora_meta, generation.layers_merged, strict=True):
        meta["layers_merged"] = layers


# (prompt, extension, encoded bytes, content type) -> (key, uri)
StoreFn = Callable[[ResolvedPrompt, str, bytes, str], tuple[str, str]]


def store_images(
    generation,
    output_format: str,
    lora_meta: list[dict[str, Any]],
    task_id: str,
    timings: dict[str, float],
    store: StoreFn,
) -> list[dict[str, Any]]:
    """Encode every rendered image, hand it to ``store``, and return the result's image entries."""
    extra = {"loras": [[m["sha256"], m["network_multiplier"]] for m in lora_meta], "task_id": task_id}
    images = []
    for rendered in generation.images:
        add_timings(timings, rendered.timings)
        data, content_type, ext = encode_image(rendered.image, output_format, rendered.prompt, extra)
        key, uri = store(rendered.prompt, ext, data, content_type)
        images.append(image_entry(rendered.prompt, key, uri, data, content_type))
    return images
