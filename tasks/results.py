"""What a task gives back: result.json (``GenerationResult``) and its progress (``Progress``).

``GenerationResult`` is the one definition of result.json, which is also the task's return value:
the worker builds it, a web backend parses it (``GenerationResult.model_validate(wait(task_id))``).
``Progress`` is the one progress type: the engine reports it per denoising step, the task stores it
as the custom Celery state ``PROGRESS`` (``Progress.as_meta``), and ``tasks.producer.wait`` hands
the stored meta to its callback.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

PROGRESS_STATE = "PROGRESS"


@dataclass(frozen=True)
class Progress:
    """Where a task is. ``prompt`` is 1-based; ``stage`` names what runs now: ``download``,
    ``variant``, ``encode``, ``denoise``, ``decode`` or ``upload``. ``host`` is the worker's node."""

    prompt: int
    prompts: int
    step: int
    steps: int
    stage: str
    host: str = ""

    def as_meta(self) -> dict[str, Any]:
        return asdict(self)


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageResult(_Result):
    index: int
    prompt: str
    neg: str
    width: int
    height: int
    sample_steps: int
    guidance_scale: float
    seed: int
    key: str
    uri: str
    sha256: str
    bytes: int
    content_type: str


class LoraResult(_Result):
    path: str
    uri: str
    etag: str | None
    sha256: str
    network_multiplier: float
    layers_merged: int


class VariantKeyResult(_Result):
    base: str
    quantization: str
    dtype: str
    loras: list[tuple[str, float]]


class VariantResult(_Result):
    """The fused variant that rendered the images: a cache hit or a new build."""

    cache_hit: bool
    build_seconds: float
    variants_cached: int
    cache_bytes: int
    evictions: int
    key: VariantKeyResult


class WorkerInfo(_Result):
    host: str
    device: str
    celery_hostname: str | None = None
    pid: int | None = None
    retries: int | None = None
    started_at: float | None = None
    peak_memory_bytes: int | None = None


class GenerationResult(_Result):
    """result.json, also the task's return value."""

    task_id: str
    status: Literal["succeeded"] = "succeeded"
    request: dict[str, Any]
    images: list[ImageResult]
    loras: list[LoraResult]
    components: dict[str, str]
    quantization: str
    dtype: str
    negative_prompt: str
    preview: bool = False
    variant: VariantResult
    versions: dict[str, str | None]
    timings: dict[str, float]
    worker: WorkerInfo
    delivery: int
    result_key: str
    created_at: str
