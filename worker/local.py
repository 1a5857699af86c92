"""``chroma-worker run``: one request on this machine, no broker, no object storage.

LoRA paths resolve under ``--lora-dir`` (``s3://bucket/key`` becomes ``<lora-dir>/bucket/key``);
images and result.json go to ``--out``. The Python entry point behind it is ``run_local``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from tasks.errors import InvalidRequest, LoraNotFound, WorkerError
from tasks.schemas import GenerationRequest, ResolvedPrompt, lora_bucket, resolve_prompts
from worker.engine import Engine, EngineConfig, LoraInput
from worker.results import build_result, lora_entry, settle, store_images

log = logging.getLogger(__name__)


def run_local(
    request: GenerationRequest,
    lora_dir: Path,
    out_dir: Path,
    engine: Engine,
    *,
    task_id: str | None = None,
    progress=None,
) -> dict[str, Any]:
    """Render ``request`` with LoRAs from ``lora_dir``; write images + result.json into ``out_dir``."""
    task_id = task_id or f"local-{uuid.uuid4().hex[:12]}"
    prompts = resolve_prompts(request)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    loras, lora_meta = local_loras(request, lora_dir)
    timings["download"] = time.perf_counter() - t0
    generation = engine.generate(prompts, loras, on_progress=progress)
    settle(generation, lora_meta, timings)
    out_dir.mkdir(parents=True, exist_ok=True)

    def write(p: ResolvedPrompt, ext: str, data: bytes, content_type: str) -> tuple[str, str]:
        path = out_dir / f"{p.index}.{ext}"
        path.write_bytes(data)
        return path.name, str(path.resolve())

    images = store_images(generation, request.output_format, lora_meta, task_id, timings, write)
    result = build_result(
        task_id=task_id,
        request=request,
        images=images,
        loras=lora_meta,
        engine=engine,
        variant=generation.variant,
        timings=timings,
        delivery=1,
        result_key="result.json",
    )
    (out_dir / "result.json").write_text(json.dumps(result, indent=2, allow_nan=False))
    return result


def local_loras(request: GenerationRequest, lora_dir: Path) -> tuple[list[LoraInput], list[dict[str, Any]]]:
    root = lora_dir.resolve()
    inputs, meta = [], []
    for i, spec in enumerate(request.loras):
        field = f"loras.{i}.path"
        bucket = lora_bucket(spec.path)
        relative = spec.path.split("/", 3)[3] if bucket else spec.path
        path = (root / bucket / relative if bucket else root / relative).resolve()
        if not path.is_relative_to(root):
            raise InvalidRequest("LoRA path leaves --lora-dir", field=field)
        if not path.is_file():
            raise LoraNotFound(f"no LoRA file at {path}", field=field)
        sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        inputs.append(LoraInput(path, sha256, spec.network_multiplier, field))
        meta.append(lora_entry(spec, str(path), None, sha256))
    return inputs, meta


def main_run(args: argparse.Namespace) -> int:
    """Entry point of ``chroma-worker run`` (the request was already validated, torch-free)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    request, config = args.checked, EngineConfig.from_settings(args.settings)
    if args.device:
        config = replace(config, device=args.device)
    engine = Engine(config)

    def progress(index: int, total: int, step: int, steps: int) -> None:
        print(f"\rprompt {index + 1}/{total}  step {step}/{steps}", end="", file=sys.stderr, flush=True)

    try:
        result = run_local(request, args.lora_dir, args.out, engine, progress=progress)
    except WorkerError as exc:
        print(f"\nerror: {exc.code}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidRequest) else 1
    print(file=sys.stderr)
    for image in result["images"]:
        size = f"{image['width']}x{image['height']}"
        print(f"image {image['index']}: {image['uri']}  seed {image['seed']}  {size}")
    print(f"result: {(args.out / 'result.json').resolve()}")
    return 0
