"""One generation request end to end: LoRAs from S3, the engine, images and result.json to S3.

A plain function (``run_job``): the Celery task wraps it, tests may call it directly. Output keys
depend only on the task id, so a redelivered task overwrites its own objects; result.json is
written last, so its presence means every image is there. A job that fails after uploading some
images removes them again (best effort) and never writes result.json.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.client import BaseClient

from storage import LoraCache, lora_location, output_key, result_key, upload_bytes, upload_result, uri
from storage.s3 import storage_errors
from tasks.schemas import GenerationRequest, ResolvedPrompt, resolve_prompts
from tasks.settings import Settings
from worker.engine import Engine, LoraInput
from worker.results import add_timings, build_result, lora_entry, settle, store_images

log = logging.getLogger(__name__)

# (stage, prompt index 0-based, prompts, step, steps)
ReportFn = Callable[[str, int, int, int, int], None]


@dataclass
class Worker:
    """What a worker process holds for its life: settings, the engine, storage."""

    settings: Settings
    engine: Engine
    s3: BaseClient
    lora_cache: LoraCache


def run_job(
    worker: Worker,
    request: GenerationRequest,
    *,
    task_id: str,
    delivery: int = 1,
    report: ReportFn | None = None,
    worker_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    settings, engine = worker.settings, worker.engine
    report = report or (lambda *_: None)
    prompts = resolve_prompts(request)
    timings: dict[str, float] = {}

    report("download", 0, len(prompts), 0, 0)
    t0 = time.perf_counter()
    loras, lora_meta = fetch_loras(worker, request)
    timings["download"] = time.perf_counter() - t0

    report("variant", 0, len(prompts), 0, 0)

    def on_progress(index: int, total: int, step: int, steps: int) -> None:
        report("denoise", index, total, step, steps)

    generation = engine.generate(prompts, loras, on_progress=on_progress)
    settle(generation, lora_meta, timings)
    bucket = settings.output_bucket
    uploaded: list[str] = []

    def upload(p: ResolvedPrompt, ext: str, data: bytes, content_type: str) -> tuple[str, str]:
        report("upload", p.index, len(prompts), p.sample_steps, p.sample_steps)
        key = output_key(settings.output_prefix, task_id, p.index, ext)
        start = time.perf_counter()
        upload_bytes(worker.s3, bucket, key, data, content_type)
        add_timings(timings, {"upload": time.perf_counter() - start})
        uploaded.append(key)
        return key, uri(bucket, key)

    rkey = result_key(settings.output_prefix, task_id)
    # An earlier delivery may have left a result.json: it must not outlive images this run replaces.
    with storage_errors("delete", bucket, rkey):
        worker.s3.delete_object(Bucket=bucket, Key=rkey)
    try:
        images = store_images(generation, request.output_format, lora_meta, task_id, timings, upload)
        result = build_result(
            task_id=task_id,
            request=request,
            images=images,
            loras=lora_meta,
            engine=engine,
            variant=generation.variant,
            timings=timings,
            delivery=delivery,
            result_key=rkey,
            worker=worker_info,
        )
        upload_result(worker.s3, bucket, rkey, result)
    except Exception:
        remove_partial(worker, uploaded)
        raise
    return result


def fetch_loras(worker: Worker, request: GenerationRequest) -> tuple[list[LoraInput], list[dict[str, Any]]]:
    settings = worker.settings
    inputs, meta, keep = [], [], []
    for i, spec in enumerate(request.loras):
        field = f"loras.{i}.path"
        bucket, key = lora_location(
            spec.path,
            lora_bucket=settings.lora_bucket,
            lora_prefix=settings.lora_prefix,
            allowed_buckets=settings.allowed_buckets,
        )
        cached = worker.lora_cache.fetch(worker.s3, bucket, key, field=field, keep=tuple(keep))
        keep.append(cached.sha256)
        inputs.append(LoraInput(cached.path, cached.sha256, spec.network_multiplier, field))
        meta.append(lora_entry(spec, cached.uri, cached.etag, cached.sha256))
    return inputs, meta


def remove_partial(worker: Worker, keys: list[str]) -> None:
    """Best effort: a failed job leaves no images behind (it never wrote result.json)."""
    for key in keys:
        try:
            # Translated first: the raw error may echo what the server sent (kept out of logs).
            with storage_errors("delete", worker.settings.output_bucket, key):
                worker.s3.delete_object(Bucket=worker.settings.output_bucket, Key=key)
        except Exception as exc:  # noqa: BLE001 - cleanup must not hide the original failure
            log.warning("could not remove partial output %s: %s", key, exc)
