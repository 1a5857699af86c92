"""One request end to end: LoRAs in, the engine, images and result.json out.

``render_request`` is the one path, for the Celery task and for ``chroma-worker run`` alike; they
differ only in where LoRAs come from (``LoraSource``: S3 through the content cache, or a local
folder) and where outputs go (``OutputSink``: S3 keys that depend only on the task id, or a local
folder). result.json is written last, so its presence means every image is there; a request that
fails after storing some images removes them again (best effort) and never writes result.json.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from botocore.client import BaseClient

from storage import LoraCache, check_lora_file, lora_location, output_key, result_key, upload_bytes, uri
from storage.outputs import upload_result
from storage.s3 import storage_errors
from tasks.errors import InvalidRequest, LoraNotFound
from tasks.keys import lora_key
from tasks.results import GenerationResult, LoraResult, Progress, WorkerInfo
from tasks.schemas import GenerationRequest, LoraSpec, lora_bucket, renders_preview, resolve_prompts
from tasks.settings import Settings
from worker import device
from worker.engine import Engine, LoraInput
from worker.results import add_timings, encode_image, image_entry, versions

log = logging.getLogger(__name__)

ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class FetchedLora:
    """A requested LoRA on local disk: where it is, what it holds, where it came from."""

    path: Path
    sha256: str
    uri: str
    etag: str | None = None


class LoraSource(Protocol):
    def fetch(self, specs: Sequence[LoraSpec]) -> list[FetchedLora]: ...


class OutputSink(Protocol):
    result_key: str

    def begin(self) -> None:
        """Before the first image: remove what an earlier delivery may have left as a result."""

    def put(self, index: int, ext: str, data: bytes, content_type: str) -> tuple[str, str]:
        """Store one image; its (key, uri)."""

    def put_result(self, result: GenerationResult) -> None: ...

    def remove(self, keys: Sequence[str]) -> None:
        """Best effort: remove stored images of a request that failed."""


def render_request(
    engine: Engine,
    request: GenerationRequest,
    *,
    task_id: str,
    loras: LoraSource,
    sink: OutputSink,
    progress: ProgressFn | None = None,
    delivery: int = 1,
    worker: dict[str, Any] | None = None,
) -> GenerationResult:
    """Render ``request`` with LoRAs from ``loras`` into ``sink``; returns result.json's content."""
    report = progress or (lambda _p: None)
    device.reset_peak_memory(engine.device)  # result.json reports this request's peak
    preview = renders_preview(request, engine.config.preview)
    prompts = resolve_prompts(request, preview)
    count = len(prompts)
    timings: dict[str, float] = {}

    report(Progress(1, count, 0, 0, "download"))
    start = time.perf_counter()
    fetched = loras.fetch(request.loras)
    timings["download"] = time.perf_counter() - start

    report(Progress(1, count, 0, 0, "variant"))
    inputs = [
        LoraInput(lora.path, lora.sha256, spec.network_multiplier, f"loras.{i}.path")
        for i, (spec, lora) in enumerate(zip(request.loras, fetched, strict=True))
    ]
    generation = engine.generate(prompts, inputs, on_progress=report, preview=preview)
    add_timings(timings, generation.timings)
    timings["variant_hit" if generation.variant["cache_hit"] else "variant_build"] = timings.pop("variant")

    negative = engine.config.negative_prompt.value
    extra = {
        "loras": [
            [lora.sha256, spec.network_multiplier] for spec, lora in zip(request.loras, fetched, strict=True)
        ],
        "negative_prompt": negative,
        "preview": generation.preview,
        "task_id": task_id,
    }
    sink.begin()
    stored: list[str] = []
    try:
        images = []
        for rendered in generation.images:
            p = rendered.prompt
            add_timings(timings, rendered.timings)
            report(Progress(p.index + 1, count, p.sample_steps, p.sample_steps, "upload"))
            data, content_type, ext = encode_image(rendered.image, request.output_format, p, extra)
            start = time.perf_counter()
            key, where = sink.put(p.index, ext, data, content_type)
            add_timings(timings, {"upload": time.perf_counter() - start})
            stored.append(key)
            images.append(image_entry(p, key, where, data, content_type))
        result = GenerationResult(
            task_id=task_id,
            request=request.model_dump(mode="json"),
            images=images,
            loras=[
                LoraResult(
                    path=spec.path,
                    uri=lora.uri,
                    etag=lora.etag,
                    sha256=lora.sha256,
                    network_multiplier=spec.network_multiplier,
                    layers_merged=layers,
                )
                for spec, lora, layers in zip(request.loras, fetched, generation.layers_merged, strict=True)
            ],
            components=engine.component_info(),
            quantization=engine.config.quantization.value,
            dtype=str(engine.dtype).removeprefix("torch."),
            negative_prompt=negative,
            preview=generation.preview,
            variant=generation.variant,
            versions=dict(versions()),
            timings={name: round(seconds, 4) for name, seconds in timings.items()},
            worker=WorkerInfo(
                host=socket.gethostname(),
                device=str(engine.device),
                peak_memory_bytes=device.peak_memory_bytes(engine.device),
                **(worker or {}),
            ),
            delivery=delivery,
            result_key=sink.result_key,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        sink.put_result(result)
    except BaseException:
        sink.remove(stored)
        raise
    return result


# -- S3 -----------------------------------------------------------------------------------------


class S3Loras:
    """LoRAs from the configured bucket/prefix (or an allowed ``s3://`` bucket), through the
    node's content-addressed cache."""

    def __init__(self, client: BaseClient, cache: LoraCache, settings: Settings):
        self.client, self.cache, self.settings = client, cache, settings

    def fetch(self, specs: Sequence[LoraSpec]) -> list[FetchedLora]:
        out: list[FetchedLora] = []
        for i, spec in enumerate(specs):
            bucket, key = lora_location(
                spec.path,
                lora_bucket=self.settings.lora_bucket,
                lora_prefix=self.settings.lora_prefix,
                allowed_buckets=self.settings.allowed_buckets,
            )
            keep = tuple(lora.sha256 for lora in out)  # the request's other LoRAs stay in the cache
            cached = self.cache.fetch(self.client, bucket, key, field=f"loras.{i}.path", keep=keep)
            out.append(FetchedLora(cached.path, cached.sha256, cached.uri, cached.etag))
        return out


class S3Outputs:
    """``<output prefix>/<task id>/<index>.<ext>`` then ``.../result.json``: keys depend only on the
    task id, so a redelivered task overwrites its own objects."""

    def __init__(self, client: BaseClient, settings: Settings, task_id: str):
        self.client, self.bucket = client, settings.output_bucket
        self.prefix, self.task_id = settings.output_prefix, task_id
        self.result_key = result_key(self.prefix, task_id)

    def begin(self) -> None:
        # An earlier delivery may have left a result.json: it must not outlive images this run replaces.
        with storage_errors("delete", self.bucket, self.result_key):
            self.client.delete_object(Bucket=self.bucket, Key=self.result_key)

    def put(self, index: int, ext: str, data: bytes, content_type: str) -> tuple[str, str]:
        key = output_key(self.prefix, self.task_id, index, ext)
        upload_bytes(self.client, self.bucket, key, data, content_type)
        return key, uri(self.bucket, key)

    def put_result(self, result: GenerationResult) -> None:
        upload_result(self.client, self.bucket, self.result_key, result.model_dump(mode="json"))

    def remove(self, keys: Sequence[str]) -> None:
        for key in keys:
            try:
                # Translated first: the raw error may echo what the server sent (kept out of logs).
                with storage_errors("delete", self.bucket, key):
                    self.client.delete_object(Bucket=self.bucket, Key=key)
            except Exception as exc:  # noqa: BLE001 - cleanup must not hide the original failure
                log.warning("could not remove partial output %s: %s", key, exc)


# -- a local folder ------------------------------------------------------------------------------


class FolderLoras:
    """LoRA paths under a folder (``s3://bucket/key`` becomes ``<folder>/bucket/key``), with the
    same file checks as a download (size limit, safetensors header)."""

    def __init__(self, folder: Path, max_bytes: int):
        self.root, self.max_bytes = folder.resolve(), max_bytes

    def fetch(self, specs: Sequence[LoraSpec]) -> list[FetchedLora]:
        out = []
        for i, spec in enumerate(specs):
            field = f"loras.{i}.path"
            bucket = lora_bucket(spec.path)
            relative = lora_key(spec.path, "")
            try:
                path = (self.root / bucket / relative if bucket else self.root / relative).resolve()
                found = path.is_file()
            except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
                raise InvalidRequest(f"LoRA path cannot be read ({exc})", field=field) from None
            if not path.is_relative_to(self.root):
                raise InvalidRequest("LoRA path leaves the LoRA folder", field=field)
            if not found:
                raise LoraNotFound(f"no LoRA file at {path}", field=field)
            check_lora_file(path, self.max_bytes, field)
            out.append(FetchedLora(path, file_sha256(path), str(path)))
        return out


class FolderOutputs:
    """``<folder>/<index>.<ext>`` and ``<folder>/result.json``."""

    result_key = "result.json"

    def __init__(self, folder: Path):
        self.folder = folder

    def begin(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / self.result_key).unlink(missing_ok=True)

    def put(self, index: int, ext: str, data: bytes, content_type: str) -> tuple[str, str]:
        path = self.folder / f"{index}.{ext}"
        path.write_bytes(data)
        return path.name, str(path.resolve())

    def put_result(self, result: GenerationResult) -> None:
        (self.folder / self.result_key).write_text(result.model_dump_json(indent=2))

    def remove(self, keys: Sequence[str]) -> None:
        for key in keys:
            (self.folder / key).unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
