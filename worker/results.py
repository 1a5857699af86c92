"""Encoding images and the pieces of result.json (``tasks.results.GenerationResult``)."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import platform
from importlib import metadata
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from tasks.results import ImageResult
from tasks.schemas import ResolvedPrompt

JPEG_COMMENT_BYTES = 65533  # a JPEG segment's length field counts itself: 65535 - 2
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
    """(bytes, content type, extension). PNGs carry the effective parameters in a text chunk, JPEGs
    in their comment where it fits (``jpeg_comment``); result.json always has them."""
    pil_format, content_type, ext = FORMATS[fmt]
    buffer = io.BytesIO()
    parameters = {**effective_parameters(p), **extra}
    if pil_format == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", json.dumps(parameters, sort_keys=True))
        image.save(buffer, format="PNG", pnginfo=info)
    elif pil_format == "JPEG":
        comment = jpeg_comment(parameters)
        image.save(buffer, format="JPEG", quality=95, **({"comment": comment} if comment else {}))
    else:
        image.save(buffer, format="WEBP", quality=95)
    return buffer.getvalue(), content_type, ext


def jpeg_comment(parameters: dict[str, Any]) -> bytes | None:
    """The parameters as JSON for a JPEG comment segment (at most ``JPEG_COMMENT_BYTES``): ASCII,
    else UTF-8 (non-ASCII text escaped takes up to 12 bytes a character), else none."""
    for ascii_only in (True, False):
        comment = json.dumps(parameters, sort_keys=True, ensure_ascii=ascii_only).encode()
        if len(comment) <= JPEG_COMMENT_BYTES:
            return comment
    return None


def image_entry(p: ResolvedPrompt, key: str, uri: str, data: bytes, content_type: str) -> ImageResult:
    return ImageResult(
        index=p.index,
        **effective_parameters(p),
        key=key,
        uri=uri,
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
        content_type=content_type,
    )


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


def add_timings(total: dict[str, float], part: dict[str, float]) -> None:
    for name, seconds in part.items():
        total[name] = total.get(name, 0.0) + seconds
